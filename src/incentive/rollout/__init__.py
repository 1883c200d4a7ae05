"""Rollouts: completions grouped by explicit group id, the strategies that plan a group's samples, and the
environments of multi-turn episodes (the built-in ones are registered on import)."""

from incentive.rollout import prefixes  # noqa: F401  (registers the built-in strategies)
from incentive.rollout.environment import ENVIRONMENTS, Environment, PolicyTurn, StepResult
from incentive.rollout.strategy import ROLLOUT_STRATEGIES, RolloutContext, RolloutStrategy, Variant
from incentive.rollout.types import Completion, RolloutBatch
from incentive.tools import environment as _tool_environment  # noqa: F401  (registers the tool environment)

__all__ = [
    "ENVIRONMENTS",
    "ROLLOUT_STRATEGIES",
    "Completion",
    "Environment",
    "PolicyTurn",
    "RolloutBatch",
    "RolloutContext",
    "RolloutStrategy",
    "StepResult",
    "Variant",
]
