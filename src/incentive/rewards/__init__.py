"""Reward parts, registered by name. Importing this package registers the built-in ones."""

from incentive.rewards import curiosity as _curiosity  # noqa: F401
from incentive.rewards import format as _format  # noqa: F401
from incentive.rewards import general_reasoner as _general_reasoner  # noqa: F401
from incentive.rewards import gui_g1 as _gui_g1  # noqa: F401
from incentive.rewards import laser as _laser  # noqa: F401
from incentive.rewards import nover as _nover  # noqa: F401
from incentive.rewards import overlong as _overlong  # noqa: F401
from incentive.rewards import ppe as _ppe  # noqa: F401
from incentive.rewards import reward_model as _reward_model  # noqa: F401
from incentive.rewards import similarity as _similarity  # noqa: F401
from incentive.rewards import temporal as _temporal  # noqa: F401
from incentive.rewards import tinyv as _tinyv  # noqa: F401
from incentive.rewards import verifier as _verifier  # noqa: F401
from incentive.rewards import wordings as _wordings  # noqa: F401
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult, Scorer

__all__ = ["REWARDS", "Reward", "RewardContext", "RewardResult", "Scorer"]
