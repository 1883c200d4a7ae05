"""Deterministic, resumable order over examples: a fresh seeded shuffle each epoch."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class EpochSampler(Generic[T]):
    """Hands out items in seeded-shuffled epochs; its position is part of every checkpoint."""

    def __init__(self, items: Sequence[T], seed: int) -> None:
        if not items:
            raise ValueError("nothing to sample from: the data set is empty")
        self.items = items
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[T]:
        out: list[T] = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._permutation()
            out.append(self.items[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()
