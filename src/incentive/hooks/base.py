"""Hooks: parts that act at a stage's events (e.g. LASER-D's target re-estimation, NOVER's proxy sync, held-out
evals), chosen by name in a recipe's ``hooks:`` list or built by the run from their own config sections. A hook may
write into the RL trainer's shared ``state`` dict, which rewards read through ``RewardContext.state``; that dict
and every hook's own ``state_dict`` are saved in checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from incentive.registry import Registry

if TYPE_CHECKING:  # the trainers import the reward and model stack; hooks only need their attributes
    from incentive.rewards.pipeline import Scored
    from incentive.rollout.types import RolloutBatch
    from incentive.training.rl import RLTrainer
    from incentive.training.stage import Stage


class Hook:
    """Events of the stages named in ``stages``, in order within a step: ``before_rollout`` and ``after_rewards``
    (RL only), ``after_step``, then ``on_checkpoint`` when the step is checkpointed. All methods optional."""

    stages: tuple[str, ...] = ("rl",)
    """The stages (``reward_model``, ``sft``, ``rl``) whose events the hook hears."""

    def start(self, trainer: Stage) -> None:
        """Before step 1 of a stage that is not resumed (a resumed one loads ``state_dict``'s result instead)."""

    def before_rollout(self, step: int, trainer: RLTrainer) -> None:
        """Before ``step`` samples its prompts."""

    def after_rewards(self, step: int, batch: RolloutBatch, scored: Scored, trainer: RLTrainer) -> None:
        """After the step's completions are scored (and dynamic sampling kept its groups), before advantages."""

    def after_step(self, step: int, record: dict[str, Any], trainer: Stage) -> None:
        """After the update of ``step``; may add metrics to ``record`` (written after all hooks ran)."""

    def on_checkpoint(self, step: int, folder: Path, trainer: Stage) -> None:
        """After the checkpoint of ``step`` is written to ``folder`` (complete, already the latest)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (on resume)."""


HOOKS: Registry[type[Hook]] = Registry("hook")
