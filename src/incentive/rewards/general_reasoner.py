"""General-Reasoner's generative-verifier reward (spec: methods/general-reasoner.md §3–4).

Per completion: the final answer is extracted, a judge LM (General-Verifier in the paper; any causal LM here)
compares it with the reference, and

    score = −0.5·[no answer] + [judge says "Final Decision: Yes"]·(1 − 0.05·min(d, 10)),
    d = |#tokens(answer or "No Answer") − #tokens(reference)|   (policy tokenizer, answer strings only)

Kept from the paper on purpose: the judge sees the literal text ``None`` when nothing was extracted, so an
unparsable completion the judge still accepts scores 0.5 − 0.05·min(d, 10) (spec pitfall 1, §8).
One addition for this toolkit's templates: with ``use_answer_tags`` (default) the answer block counts as the final
answer when there is one; the paper's extraction (last \\boxed{}, then answer markers) runs otherwise.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.judge import CachedJudge, Judge, JudgeSettings, LocalJudge
from incentive.rollout.types import Completion, RolloutBatch

GR_PROMPT = (
    "User: ### Question: {question}\n\n### Ground Truth Answer: {ground_truth}\n\n"
    "### Student Answer: {student_answer}\n\n"
    "For the above question, please verify if the student's answer is equivalent to the ground truth answer.\n"
    "Do Not solve the question by yourself, just check if the student's answer is equivalent to the ground truth "
    "answer.\n"
    "If the student's answer is correct, output \"Final Decision: Yes\". If the student's answer is incorrect, "
    'output "Final Decision: No". Assistant:'
)
"""The General-Verifier prompt: a raw completion prompt, no chat template."""

YES = "Final Decision: Yes"
STOP_WORDS = ("</s>", "<|im_end|>", "<|endoftext|>")
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")  # two levels of nested braces
_MARKER = re.compile(
    r"(?:Final Answer is:|Final Answer:|The answer is:|The solution is:|Answer:|Solution:)([^\n]*)",
    re.IGNORECASE,
)


def gr_prompt(question: str, reference: str, answer: str) -> str:
    return GR_PROMPT.format(question=question, ground_truth=reference, student_answer=answer)


def extract_final_answer(text: str) -> str | None:
    """The last non-empty \\boxed{} (two nesting levels), else the text after the last answer marker up to the
    line's end (stop tokens removed), else None."""
    boxes = _BOXED.findall(text)
    if boxes and boxes[-1].strip():
        return boxes[-1].strip()
    markers = list(_MARKER.finditer(text))
    if not markers:
        return None
    answer = markers[-1][1]
    for word in STOP_WORDS:
        answer = answer.replace(word, "")
    return answer.strip()


def gr_score(
    extracted: str | None,
    reference: str,
    yes: bool,
    tokenizer: PreTrainedTokenizerBase,
    no_answer_penalty: float = 0.5,
    length_penalty: float = 0.05,
    max_length_diff: int = 10,
) -> tuple[float, int]:
    """The paper's reward for one completion, and the token-count difference d behind its length penalty."""
    diff = abs(_count(tokenizer, extracted or "No Answer") - _count(tokenizer, reference))
    score = -no_answer_penalty if extracted is None else 0.0
    if yes:
        score += 1.0 - length_penalty * min(diff, max_length_diff)
    return score, diff


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


@REWARDS.register("general_reasoner")
class GeneralReasoner(Reward):
    """General-Reasoner's verifier reward. ``model`` is any name ``load_model`` understands, loaded on first use
    (General-Verifier itself when it is in the local HF cache); ``judge`` replaces it with any object that has
    ``complete``. Extras: ``decision``, ``no_answer``, ``length_diff``, ``cache_hit``, ``correct``."""

    def __init__(
        self,
        model: str = "embedded",
        max_new_tokens: int = 2048,
        batch_size: int = 8,
        tail_tokens: int = 1024,
        no_answer_penalty: float = 0.5,
        length_penalty: float = 0.05,
        max_length_diff: int = 10,
        use_answer_tags: bool = True,
        cache_size: int = 100_000,
        log_file: str | None = None,
        judge: Judge | None = None,
    ) -> None:
        if tail_tokens < 1:
            raise ValueError(f"tail_tokens must be >= 1, got {tail_tokens}")
        self.tail_tokens = tail_tokens
        self.no_answer_penalty = no_answer_penalty
        self.length_penalty = length_penalty
        self.max_length_diff = max_length_diff
        self.use_answer_tags = use_answer_tags
        settings = JudgeSettings(chat=False, max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.judge = CachedJudge(
            judge or LocalJudge(model, batch_size),
            gr_prompt,
            lambda out: YES in out,
            settings,
            cache_size,
            log_file,
        )

    def extract(
        self, completion: Completion, tagged: str | None, tokenizer: PreTrainedTokenizerBase
    ) -> str | None:
        """The answer block when allowed and present, else the paper's extraction on the decoded last
        ``tail_tokens`` tokens of prompt + completion."""
        if self.use_answer_tags and tagged is not None:
            return tagged
        ids = (completion.prompt_ids + completion.completion_ids)[-self.tail_tokens :]
        return extract_final_answer(tokenizer.decode(ids, skip_special_tokens=False))

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        answers = [
            self.extract(c, p.answer, ctx.tokenizer) for c, p in zip(batch, ctx.parsed(batch), strict=True)
        ]
        triples = [
            (c.example.prompt, c.example.reference, str(a)) for c, a in zip(batch, answers, strict=True)
        ]
        decisions = self.judge.decide(triples)
        scores: list[float] = []
        reasons: list[str | None] = []
        extras: dict[str, list[float]] = {
            k: [] for k in ("decision", "no_answer", "length_diff", "cache_hit", "correct")
        }
        for c, answer, decision in zip(batch, answers, decisions, strict=True):
            yes = bool(decision.verdict)
            score, diff = gr_score(
                answer,
                c.example.reference,
                yes,
                ctx.tokenizer,
                self.no_answer_penalty,
                self.length_penalty,
                self.max_length_diff,
            )
            scores.append(score)
            reasons.append(_reason(answer, decision.error))
            extras["decision"].append(float(yes))
            extras["no_answer"].append(float(answer is None))
            extras["length_diff"].append(float(diff))
            extras["cache_hit"].append(float(decision.cached))
            extras["correct"].append(float(yes))
        return RewardResult(scores, reasons, extras)


def _reason(answer: str | None, error: str | None) -> str | None:
    parts = ["no final answer found"] if answer is None else []
    if error:
        parts.append(f"judge failed: {error}")
    return "; ".join(parts) or None
