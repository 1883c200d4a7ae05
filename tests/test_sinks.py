"""Live-logging sinks: what they log, the offline/local settings, and the error for a backend not installed."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from incentive.cli import main
from incentive.config import ConfigError, load_recipe
from incentive.training import sinks
from incentive.training.metrics import MetricsLog
from incentive.training.sinks import MissingBackend, TensorBoardSink, TrackioSink, WandbSink, scalars

ROOT = Path(__file__).resolve().parents[1]
SFT = {"stage": "sft", "step": 1, "loss": 2.5, "lr": 5e-5, "tokens": 57}
RL = {
    "stage": "rl",
    "step": 2,
    "reward/mean": 0.5,
    "reward/format/mean": 1.0,
    "failed": 1,
    "train/kl": float("nan"),
    "failures": {"format: empty": 1},
    "samples": [{"completion": "x", "reward": 0.5}],
}


class Recorder:
    """Stands in for a backend module: every call is recorded as (name, args, kwargs)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self

        return call

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for n, a, k in self.calls if n == name]


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_scalars_keep_finite_numbers_only():
    assert scalars(RL) == {"reward/mean": 0.5, "reward/format/mean": 1.0, "failed": 1.0}


def test_tensorboard_sink_with_a_fake_writer(monkeypatch, tmp_path):
    writer = Recorder()
    fake_module(monkeypatch, "tensorboard")
    fake_module(monkeypatch, "torch.utils.tensorboard", SummaryWriter=lambda log_dir: writer.log_dir(log_dir))
    sink = TensorBoardSink(tmp_path)
    for record in (SFT, RL):
        sink.write(record)
    sink.close()
    assert writer.named("log_dir") == [((str(tmp_path / "tensorboard"),), {})]
    logged = {args for args, _ in writer.named("add_scalar")}
    assert ("sft/loss", 2.5, 1) in logged and ("rl/reward/mean", 0.5, 2) in logged
    assert ("rl/failed", 1.0, 2) in logged and not any(
        "samples" in a[0] or "failures" in a[0] for a in logged
    )
    assert len(writer.named("flush")) == 2 and len(writer.named("close")) == 1


def test_wandb_sink_is_offline_in_the_run_folder_with_a_step_per_stage(monkeypatch, tmp_path):
    wandb = Recorder()
    fake_module(monkeypatch, "wandb", init=wandb.init)
    sink = WandbSink(tmp_path, "proj", "run-a", {"rl": {"steps": 3}})
    for record in (SFT, RL, {**RL, "step": 3}):
        sink.write(record)
    sink.close()
    [(_, init)] = wandb.named("init")
    assert init == {
        "project": "proj",
        "name": "run-a",
        "dir": str(tmp_path),
        "mode": "offline",
        "config": {"rl": {"steps": 3}},
    }
    assert wandb.named("define_metric") == [
        (("sft/step",), {}),
        (("sft/*",), {"step_metric": "sft/step"}),
        (("rl/step",), {}),
        (("rl/*",), {"step_metric": "rl/step"}),
    ]
    logs = [args[0] for args, _ in wandb.named("log")]
    assert logs[0] == {"sft/loss": 2.5, "sft/lr": 5e-5, "sft/tokens": 57.0, "sft/step": 1}
    assert logs[2]["rl/step"] == 3 and logs[2]["rl/reward/mean"] == 0.5
    assert len(wandb.named("finish")) == 1


def test_trackio_sink_logs_locally_at_the_record_step(monkeypatch):
    trackio = Recorder()
    fake_module(monkeypatch, "trackio", init=trackio.init, log=trackio.log, finish=trackio.finish)
    sink = TrackioSink("proj", "run-a", {})
    sink.write(RL)
    sink.close()
    [(_, init)] = trackio.named("init")
    assert init == {"project": "proj", "name": "run-a", "config": {}}  # no space_id: stays local
    assert trackio.named("log") == [
        (({"rl/reward/mean": 0.5, "rl/reward/format/mean": 1.0, "rl/failed": 1.0},), {"step": 2})
    ]
    assert len(trackio.named("finish")) == 1


def test_metrics_log_forwards_every_record_and_closes_the_sinks(tmp_path):
    class Keep(sinks.MetricsSink):
        def __init__(self) -> None:
            self.seen: list[tuple[str, int, dict]] = []
            self.closed = False

        def log(self, stage, step, values):
            self.seen.append((stage, step, values))

        def close(self):
            self.closed = True

    keep = Keep()
    log = MetricsLog(tmp_path / "metrics.jsonl", [keep])
    log.write(SFT)
    log.write(RL)
    log.close()
    assert [(s, n) for s, n, _ in keep.seen] == [("sft", 1), ("rl", 2)] and keep.closed
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.fixture
def without(monkeypatch):
    """Make the named backend modules look uninstalled (find_spec finds nothing, import fails)."""

    def hide(*names: str) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)

    return hide


@pytest.mark.parametrize("backend", ["tensorboard", "trackio", "wandb"])
def test_a_missing_backend_fails_at_load_time_with_the_pip_command(without, backend):
    without(backend)
    with pytest.raises(ConfigError, match=f"pip install {backend}"):
        load_recipe(ROOT / "recipes" / "demo.yaml", [f"logging.{backend}=true"])


def test_a_missing_backend_stops_the_cli_before_the_run_folder_exists(without, tmp_path, capsys):
    without("wandb")
    run_dir = tmp_path / "run"
    args = [
        "train",
        str(ROOT / "recipes" / "demo.yaml"),
        "--run-dir",
        str(run_dir),
        "--set",
        "logging.wandb=true",
    ]
    assert main(args) == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not run_dir.exists()


def test_a_backend_that_fails_to_import_gives_the_same_hint(without):
    without("trackio")
    with pytest.raises(MissingBackend, match="pip install trackio"):
        TrackioSink("proj", "run", {})


def test_logging_section_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="logging.tensorbord"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["logging.tensorbord=true"])


def test_a_run_writes_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from incentive.run import Run

    overrides = [
        "model.name=tiny-random",
        "data.size=4",
        "sft.steps=1",
        "sft.batch_size=2",
        "rl.steps=2",
        "generation.prompts_per_step=1",
        "generation.num_generations=2",
        "generation.max_new_tokens=4",
        "eval.data=null",
        "logging.tensorboard=true",
    ]
    run = Run(load_recipe(ROOT / "recipes" / "demo.yaml", overrides), tmp_path / "run")
    run.execute()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "sft/loss" in tags and "rl/reward/mean" in tags and "rl/train/kl" in tags
    assert [e.step for e in events.Scalars("rl/reward/mean")] == [1, 2]
