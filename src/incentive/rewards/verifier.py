"""Rule verifier: reasoning-gym's own scorer for its tasks, math-verify equivalence otherwise."""

from __future__ import annotations

import math
import re
from functools import cache
from typing import Any

from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import Completion, RolloutBatch

_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def extract_answer(text: str, tagged: str | None) -> str | None:
    """The answer a completion gives: its answer block, else its last \\boxed{}, else nothing."""
    if tagged is not None:
        return tagged
    boxed = _BOXED.findall(text)
    return boxed[-1].strip() if boxed else None


@cache
def _rg_scorer(task: str) -> Any:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def math_equal(reference: str, answer: str, timeout_s: int = 5) -> bool:
    """Mathematical equivalence by math-verify, falling back to exact string match when nothing parses."""
    from math_verify import parse, verify

    gold = parse(reference, parsing_timeout=timeout_s)
    pred = parse(answer, parsing_timeout=timeout_s)
    if not gold or not pred:
        return reference.strip() == answer.strip()
    return bool(verify(gold, pred, timeout_seconds=timeout_s))


@REWARDS.register("verifier")
class RuleVerifier(Reward):
    """1 for a correct final answer, 0 otherwise; a missing answer or a checker error is a reasoned 0."""

    def __init__(self, timeout_s: int = 5) -> None:
        self.timeout_s = timeout_s

    def score(self, completion: Completion, answer: str) -> float:
        meta = completion.example.metadata
        if "task" in meta and "entry" in meta:
            return float(_rg_scorer(meta["task"])(answer, meta["entry"]))
        return 1.0 if math_equal(completion.example.reference, answer, self.timeout_s) else 0.0

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        scores: list[float] = []
        reasons: list[str | None] = []
        for completion, parsed in zip(batch, ctx.parsed(batch), strict=True):
            answer = extract_answer(completion.text, parsed.answer)
            if answer is None:
                scores.append(0.0)
                reasons.append("no answer found")
                continue
            try:
                value = self.score(completion, answer)
            except Exception as err:  # a checker bug is a scored outcome, never a crashed run
                scores.append(0.0)
                reasons.append(f"checker error: {type(err).__name__}: {err}")
                continue
            scores.append(value if math.isfinite(value) else 0.0)
            reasons.append(None)
        return RewardResult(scores, reasons)
