"""One process per run folder: a second run on a folder another live process holds is refused before anything in
it is written or deleted (--resume and --overwrite included); a lock left by a killed process does not block."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from incentive.cli import main
from incentive.config import load_recipe
from incentive.run import Run, RunError
from incentive.training.run_lock import LOCK_NAME, RunFolderBusy, RunLock

RECIPE = """
model: {name: tiny-random}
data: {source: DATA}
generation: {num_generations: 2, prompts_per_step: 1, max_new_tokens: 4}
rewards: [{name: format}]
rl: {steps: 1}
"""
HOLDER = """
import sys, time
from pathlib import Path
from incentive.training.run_lock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{i} + {i} =", "reference": str(2 * i)} for i in range(3)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("DATA", str(data)))
    return path


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A run folder as a run leaves it (its contents stand in for a live run's)."""
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text("rl: {steps: 1}\n")
    (folder / "metrics.jsonl").write_text('{"stage": "rl", "step": 1}\n')
    (folder / "checkpoints" / "latest").write_text("rl-000001")
    return folder


def holder(folder: Path) -> subprocess.Popen[str]:
    """Another process holding ``folder``'s lock (as a live run does) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def digest(folder: Path) -> str:
    """Names and contents of every file but the lock file, whose pid changes hands."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != LOCK_NAME):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_second_process_is_refused_and_the_folder_untouched(flag, recipe, old_run, capsys):
    before = digest(old_run)
    proc = holder(old_run)
    try:
        assert main(["train", str(recipe), "--run-dir", str(old_run), flag]) == 2
    finally:
        proc.kill()
        proc.wait()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert str(old_run) in errors[0] and f"pid {proc.pid}" in errors[0]
    assert digest(old_run) == before


def test_lock_of_a_killed_process_does_not_block(recipe, old_run):
    proc = holder(old_run)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (old_run / LOCK_NAME).read_text().strip() == str(proc.pid)  # the file stays; the lock went with it
    run = Run(load_recipe(recipe), old_run, overwrite=True)
    try:
        assert (old_run / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert not (old_run / "metrics.jsonl").exists() and (old_run / "config.yaml").exists()
    finally:
        run.lock.release()


def test_a_left_lock_file_alone_is_no_run(recipe, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("12345\n")
    run = Run(load_recipe(recipe), folder)
    run.lock.release()
    assert (folder / "config.yaml").exists()


@pytest.mark.parametrize("fails", [False, True])
def test_lock_is_held_until_execute_ends(recipe, tmp_path, monkeypatch, fails):
    def stages(self: Run) -> dict:
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            RunLock(self.dir).acquire()
        if fails:
            raise KeyboardInterrupt("crash")
        return {}

    monkeypatch.setattr(Run, "_execute", stages)
    run = Run(load_recipe(recipe), tmp_path / "run")
    if fails:
        with pytest.raises(KeyboardInterrupt):
            run.execute()
    else:
        run.execute()
    again = RunLock(tmp_path / "run")
    again.acquire()
    again.release()


def test_refused_checks_free_the_lock(recipe, old_run):
    with pytest.raises(RunError, match="already holds a run"):
        Run(load_recipe(recipe), old_run)
    run = Run(load_recipe(recipe), old_run, overwrite=True)  # the refused Run (kept by pytest.raises) let go
    run.lock.release()
    with pytest.raises(RunError, match="holds no run to resume"):
        Run(load_recipe(recipe), old_run.parent / "missing", resume=True)
    assert not (old_run.parent / "missing").exists()
