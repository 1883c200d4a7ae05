"""What used to hang or crash a run: a stale kernel build lock, a reward that never returns, a stop signal during
such a reward (and a second one), and a reward that returns garbage instead of a RewardResult."""

import fcntl
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.utils.cpp_extension
from torch.utils.file_baton import FileBaton

from incentive.config import RewardConfig
from incentive.data import Example
from incentive.kernels import build
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.pipeline import RewardPipeline
from incentive.rollout.types import Completion, RolloutBatch
from incentive.templates import TagFormat
from incentive.training.signals import Deadline, GracefulStop, StepDropped, TimeLimitExceeded, time_limit

# -- the kernel build lock ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_compile(tmp_path, monkeypatch):
    """A build in ``tmp_path`` whose compile only follows torch's own lock protocol (the ``lock`` baton file that
    ``cpp_extension.load`` takes or waits on) and records that it ran."""
    monkeypatch.setattr(build, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(build, "unavailable_reason", lambda: None)
    monkeypatch.setattr(build, "_loaded", lambda: False)
    calls: list[str] = []

    def load(*, build_directory: str, **kwargs: object) -> None:
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if baton.try_acquire():
            baton.release()
        else:
            baton.wait()
        calls.append(build_directory)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    folder = build.build_folder()
    folder.mkdir(parents=True)
    return folder, calls


def in_thread(fn, seconds):
    """``fn()``'s result, or a failure if it has not returned within ``seconds`` (it is left running)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return out[0]


def test_a_killed_compile_leaves_no_lock_that_blocks_the_next(fake_compile, caplog):
    folder, calls = fake_compile
    (folder / "lock").touch()  # what a compile killed half-way leaves behind
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        ops = in_thread(build.kernel_ops.__wrapped__, 20)
    assert ops is not None and calls == [str(folder)]
    assert not (folder / "lock").exists()
    assert "left by a kernel compile that was killed" in caplog.text


def test_a_live_compile_is_waited_for_then_given_up_on(fake_compile, monkeypatch, caplog):
    folder, calls = fake_compile
    monkeypatch.setenv(build.WAIT_ENV, "0.5")
    holder = os.open(folder / "incentive.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        os.write(holder, b"pid 4242")
        (folder / "lock").touch()  # the holder's own torch baton: not stale, must stay
        with caplog.at_level(logging.WARNING, logger=build.__name__):
            start = time.monotonic()
            ops = in_thread(build.kernel_ops.__wrapped__, 20)
        assert ops is None and calls == []
        assert 0.4 < time.monotonic() - start < 10
        assert (folder / "lock").exists()
        messages = [r.getMessage() for r in caplog.records]
        assert "waiting for pid 4242" in messages[0] and build.WAIT_ENV in messages[0]
        assert "PyTorch ops instead" in messages[-1] and "pid 4242" in messages[-1]
    finally:
        os.close(holder)
    assert in_thread(build.kernel_ops.__wrapped__, 20) is not None  # with the holder gone, a build goes ahead


def test_a_compile_cut_short_leaves_no_lock_behind(fake_compile, monkeypatch):
    folder, calls = fake_compile

    def interrupted_load(*, build_directory: str, **kwargs: object) -> None:
        FileBaton(os.path.join(build_directory, "lock")).try_acquire()
        raise KeyboardInterrupt  # a stop signal between torch taking its lock and releasing it

    monkeypatch.setattr(torch.utils.cpp_extension, "load", interrupted_load)
    with pytest.raises(KeyboardInterrupt):
        build.kernel_ops.__wrapped__()
    assert not (folder / "lock").exists()


def test_a_bad_wait_setting_falls_back_to_the_default(monkeypatch, caplog):
    monkeypatch.setenv(build.WAIT_ENV, "soon")
    assert build.wait_limit() == build.DEFAULT_WAIT_S
    assert build.WAIT_ENV in caplog.text
    monkeypatch.setenv(build.WAIT_ENV, "0")
    assert build.wait_limit() == 0.0


# -- rewards: time limits and garbage ----------------------------------------------------------------------------


def batch(n=4):
    example = Example("q", "7")
    return RolloutBatch([Completion(i // 2, example, "", [1], [1], f"text {i}") for i in range(n)])


def ctx():
    return RewardContext(None, TagFormat())


RETURNS = {"value": None}


@REWARDS.register("test-returns")
class Returns(Reward):
    """Returns whatever the test put in RETURNS, as it is."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        return RETURNS["value"]


@REWARDS.register("test-sleeps")
class Sleeps(Reward):
    """Sleeps ``seconds``, then scores 1; with ``stubborn``, swallows the time limit's exception and goes on."""

    def __init__(self, seconds: float = 3600.0, stubborn: bool = False) -> None:
        self.seconds = seconds
        self.stubborn = stubborn

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        marker = os.environ.get("INCENTIVE_TEST_HANG_MARKER")
        if marker and ctx.step >= 2:  # the subprocess test: hang from step 2 on, saying so
            Path(marker).touch()
            time.sleep(self.seconds)
        elif not marker:
            try:
                time.sleep(self.seconds)
            except BaseException:
                if not self.stubborn:
                    raise
        return RewardResult([1.0] * len(batch))


def scored_by(*configs):
    return RewardPipeline([RewardConfig(name="format"), *configs])(batch(), ctx())


@pytest.mark.parametrize("stubborn", [False, True])
def test_a_reward_over_its_time_limit_fails_its_samples(stubborn):
    start = time.monotonic()
    scored = scored_by(RewardConfig(name="test-sleeps", args={"stubborn": stubborn}, timeout_s=0.2))
    assert time.monotonic() - start < 5
    assert all(math.isnan(t) for t in scored.total)
    assert scored.failures == {"test-sleeps: timeout: no result within 0.2 s": 4}
    assert all(math.isfinite(s) for s in scored.components["format"])
    # within its limit a reward scores as before, and no late signal reaches later code
    assert scored_by(RewardConfig(name="test-sleeps", args={"seconds": 0.01}, timeout_s=5)).failures == {}
    time.sleep(0.3)


def test_time_limit_leaves_blocks_that_finish_in_time_alone():
    deadline = Deadline(0.3)
    with time_limit(deadline):
        time.sleep(0.01)
    time.sleep(0.5)
    assert not deadline.expired
    with pytest.raises(TimeLimitExceeded), time_limit(Deadline(0.05)):
        threading.Event().wait(30)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "returned NoneType, expected RewardResult"),
        ([1.0, 1.0, 1.0, 1.0], "returned list, expected RewardResult"),
        ({"scores": [1.0] * 4}, "returned dict, expected RewardResult"),
        (RewardResult([1.0, 1.0]), "returned 2 scores for 4 completions"),
        (RewardResult(None, [None] * 4), "returned scores as NoneType, expected a list"),
        (RewardResult([1.0] * 4, [None] * 3), "returned 3 reasons for 4 completions"),
        (RewardResult([1.0] * 4, extras=[1.0]), "returned extras as list, expected a dict"),
        (RewardResult([1.0] * 4, extras={"x": [1.0]}), "returned 1 extras['x'] for 4 completions"),
    ],
)
def test_garbage_fails_all_its_samples_with_a_reason(value, reason):
    RETURNS["value"] = value
    scored = scored_by(RewardConfig(name="test-returns"))
    assert scored.failures == {f"test-returns: {reason}": 4}
    assert all(math.isfinite(s) for s in scored.components["format"])


def test_bad_scores_fail_only_their_own_samples():
    RETURNS["value"] = RewardResult([None, "0.5", 1, math.nan], extras={"x": [None, 1, 2.0, "y"]})
    scored = scored_by(RewardConfig(name="test-returns"))
    assert scored.failed == [True, True, False, True]
    assert scored.failures == {
        "test-returns: returned score None, expected a number": 1,
        "test-returns: returned score '0.5', expected a number": 1,
        "test-returns: non-finite score": 1,
    }
    assert scored.components["test-returns"][2] == 1.0
    extras = scored.extras["test-returns/x"]
    assert math.isnan(extras[0]) and extras[1:3] == [1.0, 2.0] and math.isnan(extras[3])


# -- stop signals ------------------------------------------------------------------------------------------------


def test_a_signal_drops_droppable_work_and_a_second_one_only_repeats_the_request(capsys):
    with GracefulStop() as stop:
        with pytest.raises(StepDropped), stop.droppable():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        assert stop.requested == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # outside droppable work: noted, nothing raised
        time.sleep(0.05)
        with pytest.raises(StepDropped), stop.droppable():  # a pending request drops new work at once
            pass
    out = capsys.readouterr().out
    assert "SIGTERM received" in out and "SIGINT again" in out


def test_sigterm_during_a_hung_reward_stops_at_once_with_the_last_finished_step(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {name: tiny-random}\n"
        "data: {source: task:chain_sum, size: 16, task_args: {min_terms: 2, max_terms: 2, min_digits: 1, "
        "max_digits: 1}}\n"
        "generation: {num_generations: 2, prompts_per_step: 2, max_new_tokens: 4}\n"
        "rewards: [{name: test-sleeps}]\nrl: {steps: 5}\nrun: {checkpoint_every: 100}\n"
    )
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import test_hardening_hangs  # registers the test rewards\n"
        "from incentive.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    marker = tmp_path / "hanging"
    run_dir = tmp_path / "run"
    env = {**os.environ, "INCENTIVE_TEST_HANG_MARKER": str(marker)}
    cmd = [sys.executable, str(launcher), "train", str(recipe), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not marker.exists() and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate()[1] if proc.poll() is not None else "step 2 never started"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    assert "SIGTERM" in err and "rl step 2, which was dropped" in err and "--resume" in err
    assert (run_dir / "checkpoints" / "latest").read_text() == "rl-000001"


def test_a_stop_request_leaves_the_previous_handlers_in_place():
    """In a process that goes on after a run stopped (a notebook, the test suite), the signals keep their
    handlers: an ignored SIGTERM would pass on to every process started later."""
    import signal as signals

    from incentive.training.signals import GracefulStop

    before = signals.getsignal(signals.SIGTERM)
    with GracefulStop() as stop:
        stop._handle(signals.SIGTERM, None)
        assert stop.requested == "SIGTERM"
    assert signals.getsignal(signals.SIGTERM) is before


def test_a_process_that_exits_on_stop_ignores_repeats_from_the_moment_the_stop_leaves_the_loop(monkeypatch):
    """The CLI exits after a stop: leaving the loop with StopRequested must not put the default action back even
    briefly, or a repeated SIGTERM kills it (-15) before it reports and returns 130."""
    from incentive.training import signals as stop_signals
    from incentive.training.signals import StopRequested

    before = {sig: signal.getsignal(sig) for sig in GracefulStop.SIGNALS}
    monkeypatch.setattr(stop_signals, "exiting_on_stop", True)
    try:
        with GracefulStop():  # left without a stop: the handlers come back
            pass
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        with pytest.raises(StopRequested), GracefulStop():
            raise StopRequested("stopped")
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in GracefulStop.SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
