"""TinyV (spec: methods/tinyv.md): a small LLM judge re-checks answers the rule verifier rejected, to recover its
false negatives. In the default ``addon`` mode the judge is asked only about rule negatives and can only raise a
score, never lower one.

Modes (spec §2), with R the rule score, V the judge's 0/1 verdict and w = ``weight``:
``addon`` R when R = 1, else max(R, w·V); ``tinyv_only`` V; ``mixed`` w·V + (1 − w)·R.
The judge sees the question (the example's prompt), the reference and the *extracted* answer; a completion with no
extractable answer is not sent (the spec's Prime extractor has nothing to pass either).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal, get_args

from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.judge import CachedJudge, Decision, Judge, JudgeSettings, LocalJudge
from incentive.rewards.verifier import RuleVerifier
from incentive.rollout.types import RolloutBatch

Mode = Literal["addon", "tinyv_only", "mixed"]

TINYV_PROMPT = (
    "You are an AI tasked with identifying false negatives in answer verification. A false negative occurs when a "
    "model's answer is essentially correct but is marked as incorrect due to minor discrepancies or formatting "
    "issues. Your job is to analyze the given question, ground truth answer, and model answer to determine if the "
    "model's answer is actually correct despite appearing different from the ground truth.\n\n"
    "<question>{{QUESTION}}</question>\n\n"
    "<ground_truth_answer>{{GROUND_TRUTH_ANSWER}}</ground_truth_answer>\n\n"
    "<model_answer>{{MODEL_ANSWER}}</model_answer>\n\n"
    'Return "True" if the model\'s answer is correct, otherwise return "False".'
)
"""The released TinyV-1.5B template (tinyv_config.json), sent as one user turn of the judge's chat template."""

_FIELDS = re.compile(r"\{\{(QUESTION|GROUND_TRUTH_ANSWER|MODEL_ANSWER)\}\}")


def tinyv_prompt(question: str, reference: str, answer: str, template: str = TINYV_PROMPT) -> str:
    """Fill the three fields in one pass, so a field value that looks like a placeholder stays as written."""
    values = {"QUESTION": question, "GROUND_TRUTH_ANSWER": reference, "MODEL_ANSWER": answer}
    return _FIELDS.sub(lambda m: values[m[1]], template)


def parse_tinyv(output: str, think: bool = False) -> bool | None:
    """True/False from the judge's output ("true" is looked for first, as released); None when it says neither.
    A think-variant output counts only after ``Answer:`` or ``</think>``; without either it is unreadable."""
    text = output.strip()
    if think:
        marker = next((m for m in ("Answer:", "</think>") if m in text), None)
        if marker is None:
            return None
        text = text.split(marker)[1]
    low = text.lower()
    if "true" in low:
        return True
    if "false" in low:
        return False
    return None


@REWARDS.register("tinyv")
class TinyV(Reward):
    """Rule verifier plus a TinyV-style LLM judge. ``model`` is any name ``load_model`` understands, loaded on
    first use; ``judge`` replaces it with any object that has ``complete`` (tests, remote servers).

    Extras per completion: ``rule`` (rule score), ``judged`` (the judge gave a readable verdict), ``flipped`` (a
    rule negative the judge accepted: a recovered false negative), ``cache_hit``, ``correct`` (the judge said yes,
    or, in addon mode, the rule did). ``counts`` keeps the run's totals; ``false_negative_rate`` is flipped /
    judged rule negatives."""

    def __init__(
        self,
        model: str = "embedded",
        mode: Mode = "addon",
        weight: float = 1.0,
        think: bool = False,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        batch_size: int = 16,
        timeout_s: float = 5.0,
        prompt: str = TINYV_PROMPT,
        cache_size: int = 100_000,
        log_file: str | None = None,
        judge: Judge | None = None,
    ) -> None:
        if mode not in get_args(Mode):
            raise ValueError(f"mode must be one of {get_args(Mode)}, got {mode!r}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        missing = [
            f for f in ("QUESTION", "GROUND_TRUTH_ANSWER", "MODEL_ANSWER") if f"{{{{{f}}}}}" not in prompt
        ]
        if missing:
            raise ValueError(f"prompt lacks the placeholder(s) {', '.join('{{' + f + '}}' for f in missing)}")
        self.mode = mode
        self.weight = weight
        self.rule = RuleVerifier(timeout_s)
        settings = JudgeSettings(
            chat=True,
            max_new_tokens=max_new_tokens or (512 if think else 8),
            temperature=temperature,
            batch_size=batch_size,
        )
        self.judge = CachedJudge(
            judge or LocalJudge(model, batch_size),
            lambda q, r, a: tinyv_prompt(q, r, a, prompt),
            lambda out: parse_tinyv(out, think),
            settings,
            cache_size,
            log_file,
        )
        self.counts: Counter[str] = Counter()

    @property
    def false_negative_rate(self) -> float:
        """Share of judged rule negatives the judge accepted, over the run so far (NaN before any)."""
        judged = self.counts["judged_negatives"]
        return self.counts["flipped"] / judged if judged else float("nan")

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        verdicts = self.rule.verdicts(batch, ctx)
        asked = [
            i
            for i, v in enumerate(verdicts)
            if v.answer is not None and (self.mode != "addon" or not v.correct)
        ]
        triples = [
            (
                batch.completions[i].example.prompt,
                batch.completions[i].example.reference,
                verdicts[i].answer or "",
            )
            for i in asked
        ]
        decisions: dict[int, Decision] = dict(zip(asked, self.judge.decide(triples), strict=True))
        scores: list[float] = []
        reasons: list[str | None] = []
        extras: dict[str, list[float]] = {
            k: [] for k in ("rule", "judged", "flipped", "cache_hit", "correct")
        }
        for i, verdict in enumerate(verdicts):
            decision = decisions.get(i)
            yes = float(bool(decision and decision.verdict))
            readable = decision is not None and decision.verdict is not None
            if self.mode == "addon":
                score = verdict.score if verdict.correct else max(verdict.score, self.weight * yes)
            elif self.mode == "tinyv_only":
                score = yes
            else:
                score = self.weight * yes + (1 - self.weight) * verdict.score
            flipped = not verdict.correct and bool(yes)
            scores.append(score)
            reasons.append(_reason(decision, verdict.reason, score))
            extras["rule"].append(verdict.score)
            extras["judged"].append(float(readable))
            extras["flipped"].append(float(flipped))
            extras["cache_hit"].append(float(bool(decision and decision.cached)))
            extras["correct"].append(float(bool(yes) or (self.mode == "addon" and verdict.correct)))
            self.counts["completions"] += 1
            self.counts["rule_correct"] += verdict.correct
            self.counts["judged_negatives"] += readable and not verdict.correct
            self.counts["flipped"] += flipped
        return RewardResult(scores, reasons, extras)


def _reason(decision: Decision | None, rule_reason: str | None, score: float) -> str | None:
    if decision is not None and decision.error:
        return f"judge failed: {decision.error}"
    if decision is not None and decision.verdict is None:
        return f"judge output unreadable: {decision.output[:80]!r}"
    return rule_reason if score == 0 else None
