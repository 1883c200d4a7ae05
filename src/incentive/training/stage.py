"""The stage protocol (reward model, SFT and RL trainers all follow it) and the one loop that drives a stage:
steps, hooks, metrics, checkpoints, resume and stop requests, written once for every stage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.training.checkpoint import Checkpoints, rng_state, set_rng_state
from incentive.training.metrics import MetricsLog
from incentive.training.sampler import EpochSampler
from incentive.training.signals import GracefulStop, StepDropped, StopRequested

if TYPE_CHECKING:  # hooks import the reward stack, which imports the reward-model stage
    from incentive.hooks import Hook


class StepFailed(RuntimeError):
    """A step that could not finish (e.g. too many completions failed their rewards); the loop rewinds it, saves
    the run as it was before it, and reports the cause with how to retry."""


class StageStateMismatch(RuntimeError):
    """A checkpoint whose saved state does not fit the recipe resumed from it."""


class Stage:
    """A trainer the loop can drive. ``step`` makes one optimizer step and returns its metrics record; the rest is
    what checkpoints need. Subclasses set ``model``, ``optimizer``, ``scheduler`` and ``sampler``."""

    name: ClassVar[str]
    """The records' ``stage`` and the checkpoints' prefix."""
    label: ClassVar[str]
    """The progress bar's name."""
    folder: ClassVar[str] = "policy"
    """The checkpoint's sub-folder for the model."""

    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: EpochSampler[Any]
    hooks: Sequence[Hook] = ()
    """The hooks that act in this stage; the loop sets them, a stage with events of its own calls them."""
    droppable: Callable[[], AbstractContextManager[Any]] = nullcontext
    """Wraps work a stop request may drop mid-step (GracefulStop.droppable); the loop sets it."""

    def step(self, step: int) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model and the RNG (the checkpoint adds both) that resuming needs."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])

    def position(self) -> Any:
        """What a failed or dropped step may have moved, to :meth:`rewind` to."""
        return self.sampler.state_dict(), rng_state()

    def rewind(self, position: Any) -> None:
        sampler, rng = position
        self.sampler.load_state_dict(sampler)
        set_rng_state(rng)

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {"loss": f"{record['loss']:.3f}"}

    def ends_early(self) -> str | None:
        """Why the stage stops before its last step (e.g. its time budget is used up), or None."""
        return None


class StageLoop:
    """Drives a stage from its first unfinished step to its last: after each step the hooks, then the metrics
    record, then a checkpoint when one is due (every ``checkpoint_every`` steps, the last, on a stop request);
    hooks hear of every checkpoint. A stop request ends the stage after the step (or drops an unfinished one)."""

    def __init__(
        self,
        run_dir: Path,
        metrics: MetricsLog,
        checkpoints: Checkpoints,
        tokenizer: PreTrainedTokenizerBase,
        checkpoint_every: int,
    ) -> None:
        self.run_dir = run_dir
        self.metrics = metrics
        self.checkpoints = checkpoints
        self.tokenizer = tokenizer
        self.checkpoint_every = checkpoint_every

    def run(self, stage: Stage, steps: int, hooks: Sequence[Hook], state: dict[str, Any] | None) -> None:
        """Steps 1 to ``steps`` of ``stage``, or from the checkpoint ``state`` on."""
        hooks = [hook for hook in hooks if stage.name in hook.stages]
        stage.hooks = hooks
        if state is None:
            start = 0
            for hook in hooks:
                hook.start(stage)
        else:
            start = self._restore(stage, hooks, state)
        self.metrics.truncate_after(stage.name, start)
        with (
            GracefulStop() as stop,
            tqdm(
                range(start + 1, steps + 1), desc=stage.label, unit="step", initial=start, total=steps
            ) as bar,
        ):
            stage.droppable = stop.droppable
            for step in bar:
                record = self._step(stage, hooks, step)
                for hook in hooks:
                    hook.after_step(step, record, stage)
                self.metrics.write(record)
                bar.set_postfix(stage.postfix(record))
                early = stage.ends_early()
                if step == steps or early or stop.requested or self._periodic(step):
                    self._save(stage, hooks, step)
                if stop.requested:
                    raise StopRequested(
                        f"stopped by {stop.requested} after {stage.name} step {step} (checkpoint saved); "
                        f"continue with: incentive train <recipe> --run-dir {self.run_dir} --resume"
                    )
                if early:
                    print(f"[incentive] {early} after step {step}")
                    break

    def _step(self, stage: Stage, hooks: Sequence[Hook], step: int) -> dict[str, Any]:
        """One step; a failed or dropped one is rewound and the run saved as it was before it."""
        before = stage.position()
        try:
            return stage.step(step)
        except (StepFailed, StepDropped) as err:
            stage.rewind(before)
            saved = self._save(stage, hooks, step - 1)
            resume = f"incentive train <recipe> --run-dir {self.run_dir} --resume"
            if isinstance(err, StepDropped):
                raise StopRequested(
                    f"stopped by {err} during {stage.name} step {step}, which was dropped (checkpoint "
                    f"{saved.name} holds the run as it was before it); continue with: {resume}"
                ) from None
            raise type(err)(
                f"{err}\n  checkpoint {saved.name} holds the run as it was before this step; after fixing the "
                f"cause, retry the step with: {resume}"
            ) from err

    def _periodic(self, step: int) -> bool:
        return bool(self.checkpoint_every and step % self.checkpoint_every == 0)

    def _save(self, stage: Stage, hooks: Sequence[Hook], step: int) -> Path:
        state = {**stage.state_dict(), "hooks": [hook.state_dict() for hook in hooks]}
        folder = self.checkpoints.save(stage.name, step, stage.model, self.tokenizer, state, stage.folder)
        for hook in hooks:
            hook.on_checkpoint(step, folder, stage)
        return folder

    @staticmethod
    def _restore(stage: Stage, hooks: Sequence[Hook], state: dict[str, Any]) -> int:
        """Load a checkpoint's state into the stage and its hooks (the RNG last); returns its step."""
        saved = state.get("hooks", [])
        if len(saved) != len(hooks):
            raise StageStateMismatch(
                f"the checkpoint holds the state of {len(saved)} {stage.name} hooks, the recipe has {len(hooks)}; "
                "resume with the recipe the run started with"
            )
        stage.load_state_dict(state)
        for hook, hook_state in zip(hooks, saved, strict=True):
            hook.load_state_dict(hook_state)
        set_rng_state(state["rng"])
        return int(state["step"])
