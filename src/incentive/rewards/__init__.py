"""Reward parts, registered by name. Importing this package registers the built-in ones."""

from incentive.rewards import format as _format  # noqa: F401
from incentive.rewards import nover as _nover  # noqa: F401
from incentive.rewards import verifier as _verifier  # noqa: F401
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult, Scorer

__all__ = ["REWARDS", "Reward", "RewardContext", "RewardResult", "Scorer"]
