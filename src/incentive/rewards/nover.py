"""NOVER rewards (spec: methods/nover.md §4): how predictable the reference answer is after the generated reasoning,
under the proxy model, turned into within-group rank and efficiency rewards.

All ranking happens inside explicit groups (any number per batch, in any order). The perplexity of a whole batch is
computed once per step, with one scorer call, and shared by both parts through ``ctx.cache``. Combining with the
format reward is left to the trainer's weighted sum: both parts give 0 to format-invalid completions, so
``w_f·R_f + w_r·R_r + w_e·R_e`` is the paper's ``w_f·R_f + 𝟙(R_f=1)·(w_r·R_r + w_e·R_e)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from transformers import PreTrainedTokenizerBase

from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch

EmptyReasoning = Literal["invalid", "score"]
"""What to do with a strict-format completion whose reasoning is empty: ``invalid`` (reward 0, the default) or
``score`` it like the released code does, with N(0) = 1, i.e. its unnormalized perplexity (spec pitfall 15)."""

REASONING_BLOCK = "<{think}>\n{reasoning}\n</{think}>\n"
TARGET_BLOCK = "\n<{answer}>\n{reference}\n</{answer}>"


@dataclass(frozen=True)
class PerplexitySettings:
    """How reasoning perplexity is computed. ``reasoning_block`` follows the prompt in the context; ``target_block``
    is the scored text. Both are tokenized on their own. The defaults are the released code's layout: the proxy
    reads ``</think>\\n\\n<answer>``, and the scored target is ``\\n<answer>\\n{g}\\n</answer>``, its leading newline
    and answer tags included."""

    log_base: float = 10.0
    empty_reasoning: EmptyReasoning = "invalid"
    model: str = "proxy"
    reasoning_block: str = REASONING_BLOCK
    target_block: str = TARGET_BLOCK

    def __post_init__(self) -> None:
        if not self.log_base > 1.0:
            raise ValueError(f"log_base must be > 1, got {self.log_base}")
        if self.empty_reasoning not in get_args(EmptyReasoning):
            raise ValueError(
                f"empty_reasoning must be one of {get_args(EmptyReasoning)}, got {self.empty_reasoning!r}"
            )


@dataclass(frozen=True)
class ReasoningPerplexity:
    """Per completion: whether it takes part in ranking (else why not), its reasoning token count, and the logs of
    its normalized and raw reasoning perplexity (mean NLL / N(|t|) and mean NLL; NaN where not valid)."""

    valid: list[bool]
    reasons: list[str | None]
    lengths: list[int]
    log_ppl: list[float]
    log_ppl_raw: list[float]

    @property
    def ppl(self) -> list[float]:
        return [_exp(x) for x in self.log_ppl]

    @property
    def ppl_raw(self) -> list[float]:
        return [_exp(x) for x in self.log_ppl_raw]


def normaliser(reasoning_tokens: int, log_base: float = 10.0) -> float:
    """N(|t|) = max(1, 1 + log_b |t|); 1 for empty reasoning (log 0 = −∞). Base 10 uses ``log10``, which is exact
    on powers of ten (``math.log(1000, 10)`` is 2.9999999999999996)."""
    if reasoning_tokens <= 0:
        return 1.0
    log = math.log10(reasoning_tokens) if log_base == 10 else math.log(reasoning_tokens) / math.log(log_base)
    return max(1.0, 1.0 + log)


def reasoning_perplexity(
    batch: RolloutBatch, ctx: RewardContext, settings: PerplexitySettings | None = None
) -> ReasoningPerplexity:
    """P_r = exp(mean NLL / N(|t|)) of the reference after prompt + reasoning, for the whole batch in one scorer call.

    Context = the prompt ids the policy saw + the reasoning block; target = the answer block with the reference.
    They are tokenized separately and concatenated, so no token spans the boundary (spec pitfall 3) and exactly the
    target's tokens are scored. Cached per batch and settings through ``ctx.per_batch``.
    """
    settings = settings or PerplexitySettings()
    return ctx.per_batch(f"nover:{settings}", batch, lambda: _perplexity(batch, ctx, settings))


def _perplexity(batch: RolloutBatch, ctx: RewardContext, settings: PerplexitySettings) -> ReasoningPerplexity:
    if ctx.scorer is None:
        raise ValueError(
            "NOVER rewards need a scorer in the reward context (the trainer passes one with a proxy)"
        )
    n = len(batch)
    valid, lengths = [False] * n, [0] * n
    reasons: list[str | None] = [None] * n
    log_ppl, log_ppl_raw = [math.nan] * n, [math.nan] * n
    todo: list[int] = []
    contexts: list[list[int]] = []
    targets: list[list[int]] = []
    for i, (completion, parsed) in enumerate(zip(batch, ctx.parsed(batch), strict=True)):
        reference = completion.example.reference.strip()
        if not parsed.strict or parsed.reasoning is None:
            reasons[i] = "format invalid"
            continue
        if not reference:
            reasons[i] = "empty reference"
            continue
        lengths[i] = len(_ids(ctx.tokenizer, parsed.reasoning))
        if lengths[i] == 0 and settings.empty_reasoning == "invalid":
            reasons[i] = "empty reasoning"
            continue
        block = settings.reasoning_block.format(think=ctx.tags.think, reasoning=parsed.reasoning)
        target = settings.target_block.format(answer=ctx.tags.answer, reference=reference)
        todo.append(i)
        contexts.append(list(completion.prompt_ids) + _ids(ctx.tokenizer, block))
        targets.append(_ids(ctx.tokenizer, target))
    if todo:
        scored = ctx.scorer.logprobs(contexts, targets, model=settings.model)
        for i, logprobs in zip(todo, scored, strict=True):
            nll = -float(logprobs.double().mean())
            if math.isnan(nll):
                reasons[i] = "perplexity is NaN"
                continue
            valid[i] = True
            log_ppl_raw[i] = nll
            log_ppl[i] = nll / normaliser(lengths[i], settings.log_base)
    return ReasoningPerplexity(valid, reasons, lengths, log_ppl, log_ppl_raw)


def group_ranks(values: Sequence[float], valid: Sequence[bool]) -> list[float]:
    """One group: 1-based rank by ascending value among the valid ones (ties favour the earlier index); NaN for
    invalid ones. Logged next to each sample so a reader sees where its reasoning stood."""
    order = sorted((i for i in range(len(values)) if valid[i]), key=lambda i: values[i])
    out = [math.nan] * len(values)
    for rank, i in enumerate(order):
        out[i] = float(rank + 1)
    return out


def rank_rewards(values: Sequence[float], valid: Sequence[bool]) -> list[float]:
    """One group: (n − k)/n for the valid one of 0-based rank k by ascending value (stable: ties favour the earlier
    index); 0 for invalid ones. Any increasing transform of P_r (e.g. its log) gives the same ranks."""
    ranks = group_ranks(values, valid)
    count = sum(valid)
    return [(count - r + 1) / count if math.isfinite(r) else 0.0 for r in ranks]


def efficiency_rewards(lengths: Sequence[int], values: Sequence[float], valid: Sequence[bool]) -> list[float]:
    """One group: the share of the other valid completions that this one strictly dominates (shorter reasoning and
    lower P_r); 0 for invalid ones and when fewer than two are valid."""
    members = [i for i in range(len(values)) if valid[i]]
    out = [0.0] * len(values)
    if len(members) < 2:
        return out
    for i in members:
        beaten = sum(1 for j in members if lengths[i] < lengths[j] and values[i] < values[j])
        out[i] = beaten / (len(members) - 1)
    return out


class _NoverPart(Reward):
    """Shared settings of the NOVER parts; two parts with equal settings share one perplexity computation."""

    def __init__(
        self,
        log_base: float = 10.0,
        empty_reasoning: EmptyReasoning = "invalid",
        model: str = "proxy",
        reasoning_block: str = REASONING_BLOCK,
        target_block: str = TARGET_BLOCK,
    ) -> None:
        self.settings = PerplexitySettings(log_base, empty_reasoning, model, reasoning_block, target_block)


@REWARDS.register("nover_reasoning")
class NoverReasoning(_NoverPart):
    """R_r: within-group rank of reasoning perplexity (best 1, worst 1/n, invalid 0)."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        rp = reasoning_perplexity(batch, ctx, self.settings)
        scores = _per_group(
            batch, lambda idx: rank_rewards([rp.log_ppl[i] for i in idx], [rp.valid[i] for i in idx])
        )
        ranks = _per_group(
            batch, lambda idx: group_ranks([rp.log_ppl[i] for i in idx], [rp.valid[i] for i in idx])
        )
        return RewardResult(scores, list(rp.reasons), {"ppl": rp.ppl, "ppl_raw": rp.ppl_raw, "rank": ranks})


@REWARDS.register("nover_efficiency")
class NoverEfficiency(_NoverPart):
    """R_e: share of the group's other valid completions dominated on both reasoning length and perplexity."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        rp = reasoning_perplexity(batch, ctx, self.settings)
        scores = _per_group(
            batch,
            lambda idx: efficiency_rewards(
                [rp.lengths[i] for i in idx], [rp.log_ppl[i] for i in idx], [rp.valid[i] for i in idx]
            ),
        )
        tokens = [float(n) if ok else math.nan for n, ok in zip(rp.lengths, rp.valid, strict=True)]
        return RewardResult(scores, list(rp.reasons), {"reasoning_tokens": tokens})


def _per_group(batch: RolloutBatch, score_group: Callable[[list[int]], list[float]]) -> list[float]:
    scores = [0.0] * len(batch)
    for indices in batch.groups().values():
        for i, score in zip(indices, score_group(indices), strict=True):
            scores[i] = score
    return scores


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _exp(x: float) -> float:
    """exp that overflows to inf instead of raising (a valid but hopeless target) and keeps NaN."""
    return math.exp(x) if x < 709.0 else (math.nan if math.isnan(x) else math.inf)
