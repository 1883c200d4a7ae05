"""LASER, LASER-D and LASER-DE (spec: methods/laser.md): a step length reward with a target length L_T,
difficulty-aware targets re-estimated from a monitoring set (the ``laser_monitor`` hook), and an exploration
bonus for long wrong answers that are not degenerate repetition.

R = C(y) + λ(y)·S(y): C = 1 correct, −0.5 wrong, −1 format failure; S = α·𝟙(L ≤ L_T) for correct answers.
Correctness is computed first, shaping last (spec pitfall 5).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any, Literal, get_args

from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.outcome import Outcome, outcomes
from incentive.rollout.types import Completion, RolloutBatch

Bucket = Literal["high", "medium", "low"]
BUCKETS: tuple[Bucket, ...] = ("high", "medium", "low")
LengthRewardKind = Literal["reward", "penalty", "hybrid"]
RoundMethod = Literal["floor", "ceil"]
STATE_KEY = "laser/targets"
"""Shared-state key: bucket → target length, or None for "no candidate fits: use the batch's longest"."""


def difficulty_bucket(correct: int, n: int) -> Bucket:
    """high (easy) if acc ≥ 2/3, medium if acc ≥ 1/3, else low; exact in integers, and the same convention at
    reward and at monitor time (spec pitfall 1)."""
    if 3 * correct >= 2 * n:
        return "high"
    return "medium" if 3 * correct >= n else "low"


def length_thresholds(lower: int, upper: int, interval: int) -> list[int]:
    """Candidate targets [lower, lower+interval, …, upper]; below one interval: [lower, interval, 2·interval, …]."""
    if lower < interval:
        return [lower, *range(interval, upper + 1, interval)]
    return list(range(lower, upper + 1, interval))


def expected_correct(bucket: Bucket, n: int, round_method: RoundMethod = "floor") -> int:
    """C_A, the expected number of correct rollouts of a bucket's prompt: n·2/3, n/3 (rounded) and 1."""
    if bucket == "low":
        return 1
    share = 2 if bucket == "high" else 1
    return (share * n) // 3 if round_method == "floor" else -((-share * n) // 3)


def choose_target(
    lengths: Sequence[int],
    thresholds: Sequence[int],
    bucket: Bucket,
    n: int,
    expected_n_correct: int = 1,
    round_method: RoundMethod = "floor",
) -> int | None:
    """The smallest candidate l with ECR = P_l·C_A ≥ expected (floored with ``floor``), where the coverage P_l is
    the share of *all* the bucket's monitoring responses with length ≤ l; None when no candidate qualifies or
    the bucket is empty (the reward then uses the batch's longest completion: no length pressure)."""
    if not lengths:
        return None
    c_a, total = expected_correct(bucket, n, round_method), len(lengths)
    for limit in sorted(thresholds):
        covered = sum(length <= limit for length in lengths)
        ecr_ok = (
            covered * c_a // total >= expected_n_correct
            if round_method == "floor"
            else covered * c_a >= expected_n_correct * total
        )
        if ecr_ok:
            return limit
    return None


def estimate_targets(
    groups: Iterable[tuple[Sequence[int], Sequence[bool]]],
    thresholds: Sequence[int],
    n: int,
    expected_n_correct: int = 1,
    round_method: RoundMethod = "floor",
) -> dict[Bucket, int | None]:
    """Targets per bucket from monitoring groups of (lengths, correct flags), one group per prompt."""
    by_bucket: dict[Bucket, list[int]] = {b: [] for b in BUCKETS}
    for lengths, correct in groups:
        by_bucket[difficulty_bucket(sum(correct), len(correct))].extend(lengths)
    return {
        b: choose_target(by_bucket[b], thresholds, b, n, expected_n_correct, round_method) for b in BUCKETS
    }


def repetition_start(tokens: Sequence[int], n: int = 4) -> int:
    """Where degenerate repetition starts, or ``len(tokens)`` when there is none (LASER-DE's detector).

    Scans backward with n-grams (n = 2 below 30 tokens, 3 below 100, else min(4, n)); an n-gram seen twice
    (three times from 200 tokens on) with two consecutive occurrences closer than len/3 marks a repeat, as does
    any repeated 2n-token pattern. n-grams of one token repeated are skipped for n > 2."""
    size = len(tokens)
    if size <= 2 * n:
        return size
    n = 2 if size < 30 else 3 if size < 100 else min(4, n)
    needed = 3 if size >= 200 else 2
    seen: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in range(size - n, -1, -1):
        gram = tuple(tokens[i : i + n])
        if n > 2 and len(set(gram)) == 1:
            continue
        seen[gram].append(i)
        ordered = seen[gram][::-1]
        if len(ordered) >= needed and any(b - a < size // 3 for a, b in pairwise(ordered)):
            return ordered[0]
    if size >= 4 * n:
        patterns: set[tuple[int, ...]] = set()
        for i in range(size - 2 * n, -1, -1):
            pattern = tuple(tokens[i : i + 2 * n])
            if pattern in patterns:
                return i
            patterns.add(pattern)
    return size


@REWARDS.register("laser")
class Laser(Reward):
    """Static LASER: C(y) + 𝟙(correct)·α·𝟙(L ≤ L_T). ``kind``: reward (+α if short), penalty (−α if long),
    hybrid (both). L = completion tokens."""

    def __init__(
        self,
        target_length: int = 4096,
        alpha: float = 0.5,
        kind: LengthRewardKind = "reward",
        correct: float = 1.0,
        wrong: float = -0.5,
        unformatted: float = -1.0,
        timeout_s: float = 5.0,
    ) -> None:
        if kind not in get_args(LengthRewardKind):
            raise ValueError(f"kind must be one of {get_args(LengthRewardKind)}, got {kind!r}")
        if target_length < 1:
            raise ValueError(f"target_length must be ≥ 1, got {target_length}")
        self.target_length = target_length
        self.alpha = alpha
        self.kind = kind
        self.base = {"correct": correct, "wrong": wrong, "unformatted": unformatted}
        self.timeout_s = timeout_s

    def targets(self, batch: RolloutBatch, ctx: RewardContext, flags: Sequence[Outcome]) -> list[int]:
        """L_T per completion."""
        return [self.target_length] * len(batch)

    def shape(self, completion: Completion, outcome: Outcome, target: int) -> float:
        """S(y)·λ(y): the length term added to the correctness term."""
        if not outcome.correct:
            return 0.0
        short = completion.length <= target
        if self.kind == "reward":
            return self.alpha if short else 0.0
        if self.kind == "penalty":
            return 0.0 if short else -self.alpha
        return self.alpha if short else -self.alpha

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        flags = outcomes(batch, ctx, self.timeout_s)
        targets = self.targets(batch, ctx, flags)
        scores, terms = [], []
        for completion, outcome, target in zip(batch, flags, targets, strict=True):
            kind = "correct" if outcome.correct else "wrong" if outcome.formatted else "unformatted"
            term = self.shape(completion, outcome, target)
            scores.append(self.base[kind] + term)
            terms.append(term)
        extras = {"target": [float(t) for t in targets], "length_term": terms}
        extras["correct"] = [float(o.correct) for o in flags]
        return RewardResult(scores, extras=extras)


@REWARDS.register("laser_d")
class LaserD(Laser):
    """LASER-D: L_T per prompt from its difficulty bucket (group accuracy) and the targets the ``laser_monitor``
    hook last estimated (shared state); before any monitoring pass every bucket uses ``target_length``."""

    def targets(self, batch: RolloutBatch, ctx: RewardContext, flags: Sequence[Outcome]) -> list[int]:
        chosen: Mapping[str, Any] | None = ctx.state.get(STATE_KEY)
        if not chosen:
            return super().targets(batch, ctx, flags)
        longest = max(c.length for c in batch)
        out = [0] * len(batch)
        for idx in batch.groups().values():
            target = chosen[difficulty_bucket(sum(flags[i].correct for i in idx), len(idx))]
            for i in idx:
                out[i] = longest if target is None else int(target)
        return out


@REWARDS.register("laser_de")
class LaserDE(LaserD):
    """LASER-DE: LASER-D plus +α for a formatted wrong answer longer than its target that is not degenerate
    repetition (it was exploring); format failures get nothing."""

    def shape(self, completion: Completion, outcome: Outcome, target: int) -> float:
        if outcome.correct or not outcome.formatted or completion.length <= target:
            return super().shape(completion, outcome, target)
        ids = completion.completion_ids
        return self.alpha if repetition_start(ids) == len(ids) else 0.0
