"""Checkpoints: policy (or adapter) + trainer state, written atomically (temp folder, then rename), last K kept."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoints:
    """Folder ``checkpoints/<stage>-<step>`` per checkpoint; ``latest`` names the newest complete one."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last

    def save(
        self,
        stage: str,
        step: int,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        trainer_state: dict[str, Any],
        folder: str = "policy",
    ) -> Path:
        """Write ``policy/`` (weights or adapter + tokenizer, loadable by ``incentive eval``; ``folder`` names it
        for a model that is not the policy) and ``trainer.pt``."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{stage}-{step:06d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        model.save_pretrained(tmp / folder)
        tokenizer.save_pretrained(tmp / folder)
        torch.save({**trainer_state, "stage": stage, "step": step, "rng": rng_state()}, tmp / "trainer.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = self.root / ".latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, self.root / "latest")
        _fsync_dir(self.root)
        self._prune()
        return final

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "trainer.pt").exists() else None

    def load_state(self, path: Path) -> dict[str, Any]:
        return torch.load(path / "trainer.pt", weights_only=False)

    def _prune(self) -> None:
        done = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        done.sort(key=lambda p: p.stat().st_mtime)
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
