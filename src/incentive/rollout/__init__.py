"""Rollouts: completions grouped by explicit group id."""

from incentive.rollout.types import Completion, RolloutBatch

__all__ = ["Completion", "RolloutBatch"]
