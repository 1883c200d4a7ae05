"""Pixel Reasoner's curiosity-driven shaping (spec: methods/pixel-reasoner.md) and its tool-aware correctness:
r_i = c_i + α·r_curiosity + β·r_penalty. n_i is the engine's ``tool_executed`` when a recipe has ``tools`` (a
call refused at ``max_calls`` ends the episode unexecuted and, as in the release, is not counted), otherwise the
``<tool_call>…</tool_call>`` blocks in the text."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal, get_args

from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.verifier import RuleVerifier
from incentive.rollout.types import RolloutBatch

CuriosityForm = Literal["paper", "release"]


def curiosity_terms(
    calls: Sequence[int],
    threshold: float = 0.3,
    alpha: float = 0.5,
    penalty: float = 0.05,
    free_calls: int = 1,
    form: CuriosityForm = "paper",
) -> tuple[list[float], float]:
    """Per rollout of one query: α·max(H − RaPR, 0)·𝟙[n_i > 0] + β·min(N − n_i, 0), and the query's RaPR (share
    of rollouts that call a tool). ``release`` rescales the bonus by 0.25 / RaPR as the released code does
    (its video setting is α = 2/3)."""
    rapr = sum(n > 0 for n in calls) / len(calls)
    out = []
    for n in calls:
        if n == 0:
            out.append(0.0)
            continue
        bonus = alpha * max(threshold - rapr, 0.0)
        if form == "release":
            bonus = bonus / rapr * 0.25
        out.append(bonus + penalty * min(free_calls - n, 0))
    return out, rapr


@REWARDS.register("curiosity")
class CuriosityBonus(Reward):
    """Tool users get a bonus while fewer than ``threshold`` of their group's rollouts use a tool; every call
    beyond ``free_calls`` costs ``penalty``."""

    def __init__(
        self,
        threshold: float = 0.3,
        alpha: float = 0.5,
        penalty: float = 0.05,
        free_calls: int = 1,
        form: CuriosityForm = "paper",
        tool_tag: str = "tool_call",
    ) -> None:
        if form not in get_args(CuriosityForm):
            raise ValueError(f"form must be one of {get_args(CuriosityForm)}, got {form!r}")
        self.threshold, self.alpha, self.penalty, self.free_calls, self.form = (
            threshold,
            alpha,
            penalty,
            free_calls,
            form,
        )
        tag = re.escape(tool_tag)
        self.call = re.compile(rf"<{tag}>.*?</{tag}>", re.DOTALL)

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        calls = [int(c.info.get("tool_executed", len(self.call.findall(c.text)))) for c in batch]
        scores, rates = [0.0] * len(batch), [0.0] * len(batch)
        for idx in batch.groups().values():
            terms, rapr = curiosity_terms(
                [calls[i] for i in idx], self.threshold, self.alpha, self.penalty, self.free_calls, self.form
            )
            for i, term in zip(idx, terms, strict=True):
                scores[i], rates[i] = term, rapr
        return RewardResult(scores, extras={"rapr": rates, "tool_calls": [float(n) for n in calls]})


@REWARDS.register("tool_verifier")
class ToolAwareVerifier(RuleVerifier):
    """The rule verifier, except that a correct answer after a tool error never repaired by a later successful
    call scores 0 (the release's ``final_error_flags``, read at the rollout's own index). Logs accuracy with and
    without a tool call (NaN where a completion is in the other set, so each mean is over its own set)."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        result = super().__call__(batch, ctx)
        for i, completion in enumerate(batch):
            if completion.info.get("final_tool_error") and result.scores[i] > 0:
                result.scores[i] = 0.0
                result.reasons[i] = "correct, but the last tool call failed and was never repaired"
        used = [int(c.info.get("tool_executed", 0)) > 0 for c in batch]
        correct = [float(s >= 1.0) for s in result.scores]
        result.extras["correct_with_tool"] = [
            c if u else math.nan for c, u in zip(correct, used, strict=True)
        ]
        result.extras["correct_without_tool"] = [
            math.nan if u else c for c, u in zip(correct, used, strict=True)
        ]
        return result
