"""The reward interface: a part sees the whole batch (explicit group ids) plus a context, and returns one score
per completion and a reason for every failure."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from incentive.data.example import Example
from incentive.registry import Registry
from incentive.rollout.types import RolloutBatch
from incentive.templates import Parsed, TagFormat

T = TypeVar("T")


class Scorer(Protocol):
    """Teacher-forced logprobs of target token ids after context token ids, by a named model."""

    def logprobs(
        self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], model: str = "proxy"
    ) -> list[torch.Tensor]: ...


Generate = Callable[[Sequence[Example], int], RolloutBatch]
"""n extra completions per example from the current policy (rendered with the run's template, sampled as in
training; group id i belongs to examples[i]); they are for the reward's eyes only and never trained on."""


@dataclass
class RewardContext:
    """What a reward part may look at besides the completions. ``state`` is shared with the run's hooks (e.g.
    LASER-D's target lengths) and saved in checkpoints; ``cache`` lives for one batch."""

    tokenizer: PreTrainedTokenizerBase
    tags: TagFormat
    step: int = 0
    scorer: Scorer | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None
    generate: Generate | None = None

    def per_batch(self, key: str, batch: RolloutBatch, compute: Callable[[], T]) -> T:
        """``compute()`` once per batch and key, shared by all reward parts. The batch itself is kept beside the
        value, so a later batch that happens to reuse the same ``id()`` can never be served a stale result."""
        cached = self.cache.get(key)
        if cached is None or cached[0] is not batch:
            cached = (batch, compute())
            self.cache[key] = cached
        return cached[1]

    def parsed(self, batch: RolloutBatch) -> list[Parsed]:
        """Each completion parsed once per batch, shared by all reward parts."""
        return self.per_batch("parsed", batch, lambda: [self.tags.parse(c.text) for c in batch])


@dataclass
class RewardResult:
    """Scores (NaN = failed, see ``reasons``) and optional per-completion values worth logging."""

    scores: list[float]
    reasons: list[str | None] = field(default_factory=list)
    extras: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.reasons:
            self.reasons = [None] * len(self.scores)

    @property
    def failed(self) -> list[bool]:
        return [not math.isfinite(s) for s in self.scores]


class Reward(ABC):
    """A reward part. Subclasses take their settings as typed keyword arguments."""

    @abstractmethod
    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult: ...

    def data_problems(self, example: Example) -> list[str]:
        """Why this part can never score ``example``, each as "needs …" (a column missing or malformed); a run
        checks its training data with it before any model loads, rather than fail every sample of it later."""
        return []


REWARDS: Registry[type[Reward]] = Registry("reward")
