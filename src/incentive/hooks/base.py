"""RL hooks: parts that act between steps (e.g. LASER-D's target re-estimation), chosen by name in a recipe's
``hooks:`` list. A hook may write into the trainer's shared ``state`` dict, which rewards read through
``RewardContext.state``; that dict and every hook's own ``state_dict`` are saved in checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from incentive.registry import Registry

if TYPE_CHECKING:  # the trainer imports the reward and model stack; hooks only need its attributes
    from incentive.training.rl import RLTrainer


class Hook:
    """Called once before the first RL step of a fresh run, then after every step; all methods optional."""

    def start(self, trainer: RLTrainer) -> None:
        """Before step 1 of a run that is not resumed."""

    def after_step(self, step: int, record: dict[str, Any], trainer: RLTrainer) -> None:
        """After the update of ``step``; may add metrics to ``record`` (written after all hooks ran)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (on resume)."""


HOOKS: Registry[type[Hook]] = Registry("hook")
