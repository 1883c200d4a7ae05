"""DAPO's soft overlong punishment: no penalty up to L_max − L_cache tokens, then a linear fall to −factor at
L_max (the generation limit by default), so a completion near the limit learns to finish before it."""

from __future__ import annotations

from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch


def overlong_penalty(length: int, max_length: int, cache: int, factor: float = 1.0) -> float:
    """0 if length ≤ max_length − cache, else −factor·(length − (max_length − cache)) / cache, at most −factor."""
    start = max_length - cache
    if length <= start:
        return 0.0
    return -factor * min(length - start, cache) / cache


@REWARDS.register("overlong_penalty")
class SoftOverlongPenalty(Reward):
    """``cache`` (L_cache) defaults to a fifth of L_max (DAPO: 4096 of 20480); ``max_length`` (L_max) to
    generation.max_new_tokens."""

    def __init__(self, cache: int | None = None, max_length: int | None = None, factor: float = 1.0) -> None:
        if (cache is not None and cache < 1) or (max_length is not None and max_length < 1):
            raise ValueError("cache and max_length must be ≥ 1")
        self.cache, self.max_length, self.factor = cache, max_length, factor

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        limit = self.max_length or ctx.max_new_tokens
        if limit is None:
            raise ValueError("overlong_penalty needs max_length (or a trainer that passes max_new_tokens)")
        cache = min(self.cache or max(1, limit // 5), limit)
        return RewardResult([overlong_penalty(c.length, limit, cache, self.factor) for c in batch])
