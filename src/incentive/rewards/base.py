"""The reward interface: a part sees the whole batch (explicit group ids) plus a context, and returns one score
per completion and a reason for every failure."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from incentive.registry import Registry
from incentive.rollout.types import RolloutBatch
from incentive.templates import Parsed, TagFormat


class Scorer(Protocol):
    """Teacher-forced logprobs of target token ids after context token ids, by a named model."""

    def logprobs(
        self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], model: str = "proxy"
    ) -> list[torch.Tensor]: ...


@dataclass
class RewardContext:
    """What a reward part may look at besides the completions."""

    tokenizer: PreTrainedTokenizerBase
    tags: TagFormat
    step: int = 0
    scorer: Scorer | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def parsed(self, batch: RolloutBatch) -> list[Parsed]:
        """Each completion parsed once per step, shared by all reward parts."""
        key = f"parsed:{id(batch)}"
        if key not in self.cache:
            self.cache[key] = [self.tags.parse(c.text) for c in batch]
        return self.cache[key]


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


REWARDS: Registry[type[Reward]] = Registry("reward")
