"""Live logging of the metrics records besides metrics.jsonl: TensorBoard, trackio, Weights & Biases (offline).

None of the three is a dependency: each is imported when its sink is built, and a recipe that turns on one that
is not installed is refused at load time with the pip command that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from incentive.config import Recipe

BACKENDS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
"""Config switch → the module (and pip package) it needs."""


class MissingBackend(ValueError):
    """A logging backend turned on in the recipe is not installed."""


def _hint(switch: str) -> str:
    """What to run (or change) when a chosen backend is missing."""
    package = BACKENDS[switch]
    return (
        f"logging.{switch} is on but {package} is not installed: run `pip install {package}`, "
        f"or set logging.{switch}: false"
    )


def check_installed(switches: list[str]) -> None:
    """Fail at config time, before any model is loaded, for a chosen backend that is not installed."""
    for switch in switches:
        if importlib.util.find_spec(BACKENDS[switch]) is None:
            raise MissingBackend(_hint(switch))


def _import(switch: str, module: str | None = None) -> ModuleType:
    """Import a backend when its sink is built, turning an ImportError into the install hint."""
    try:
        return importlib.import_module(module or BACKENDS[switch])
    except ImportError as err:
        raise MissingBackend(_hint(switch)) from err


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers under their own names; stage, step, samples and other lists/dicts dropped."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in ("stage", "step") and isinstance(value, int | float) and math.isfinite(value)
    }


class MetricsSink:
    """Receives every metrics record; subclasses log its scalars as ``<stage>/<key>`` at the record's step."""

    def write(self, record: dict[str, Any]) -> None:
        """Log one metrics record's scalars (records without any are skipped)."""
        stage, step = str(record.get("stage", "run")), int(record.get("step", 0))
        values = {f"{stage}/{k}": v for k, v in scalars(record).items()}
        if values:
            self.log(stage, step, values)

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        """Send ``values`` (already prefixed with the stage) to the backend at ``step``."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release the backend (end of the run)."""


class TensorBoardSink(MetricsSink):
    """Event files in RUN_DIR/tensorboard (``tensorboard --logdir RUN_DIR/tensorboard``); flushed every step."""

    def __init__(self, run_dir: Path) -> None:
        _import("tensorboard")
        writer_module = _import("tensorboard", "torch.utils.tensorboard")
        self.writer = writer_module.SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrackioSink(MetricsSink):
    """A local trackio run (no Space); ``trackio show --project PROJECT`` opens the dashboard."""

    def __init__(self, project: str, name: str, config: dict[str, Any]) -> None:
        self.trackio = _import("trackio")
        self.trackio.init(project=project, name=name, config=config)

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class WandbSink(MetricsSink):
    """An offline W&B run under RUN_DIR/wandb (``wandb sync`` uploads it later); one x-axis per stage."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any]) -> None:
        wandb = _import("wandb")
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), mode="offline", config=config)
        self.stages: set[str] = set()

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        if stage not in self.stages:  # SFT and RL steps both start at 1: each stage gets its own step metric
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.run.log({**values, f"{stage}/step": step})

    def close(self) -> None:
        self.run.finish()


def build_sinks(recipe: Recipe, run_dir: Path) -> list[MetricsSink]:
    """The sinks the recipe's ``logging`` section turns on, named after the run folder."""
    cfg = recipe.logging
    config = recipe.model_dump(mode="json")
    sinks: list[MetricsSink] = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    if cfg.trackio:
        sinks.append(TrackioSink(cfg.project, run_dir.name, config))
    if cfg.wandb:
        sinks.append(WandbSink(run_dir, cfg.project, run_dir.name, config))
    return sinks
