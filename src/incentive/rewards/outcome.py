"""Per-completion outcome flags (format, correctness) that shaping rewards build on: compute correctness first,
shape last (LASER pitfall 5), once per batch."""

from __future__ import annotations

from dataclasses import dataclass

from incentive.rewards.base import RewardContext
from incentive.rewards.verifier import RuleVerifier
from incentive.rollout.types import RolloutBatch


@dataclass(frozen=True)
class Outcome:
    """``formatted``: the template's strict format holds; ``correct``: formatted and fully right per the rule
    verifier (partial credit does not count)."""

    formatted: bool
    correct: bool


def outcomes(batch: RolloutBatch, ctx: RewardContext, timeout_s: float = 5.0) -> list[Outcome]:
    """Outcomes of a batch, cached in ``ctx.cache`` so several parts share one verifier pass."""

    def compute() -> list[Outcome]:
        verdicts = RuleVerifier(timeout_s=timeout_s).verdicts(batch, ctx)
        return [
            Outcome(p.strict, p.strict and v.correct)
            for p, v in zip(ctx.parsed(batch), verdicts, strict=True)
        ]

    return ctx.per_batch("outcomes", batch, compute)
