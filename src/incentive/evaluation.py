"""Held-out evaluation: accuracy by a verifier, format rate and lengths, judged apart from training rewards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.data.example import Example
from incentive.engines.hf import HFEngine, SamplingParams
from incentive.rewards.base import RewardContext
from incentive.rewards.verifier import RuleVerifier
from incentive.templates import Template


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    examples: Sequence[Example],
    params: SamplingParams,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Accuracy (mean over samples), strict-format rate and completion lengths on ``examples``."""
    engine = HFEngine(model, tokenizer, batch_size=batch_size)
    prompts = [template.render(e, tokenizer) for e in examples]
    batch = engine.generate(examples, prompts, list(range(len(examples))), params)
    ctx = RewardContext(tokenizer, template.tags)
    correct = RuleVerifier()(batch, ctx).scores
    parsed = ctx.parsed(batch)
    lengths = sorted(c.length for c in batch)
    n = len(batch)
    return {
        "accuracy": sum(correct) / n,
        "format_rate": sum(p.strict for p in parsed) / n,
        "answer_rate": sum(p.answer is not None for p in parsed) / n,
        "length_mean": sum(lengths) / n,
        "length_p50": lengths[n // 2],
        "truncated_share": sum(c.truncated for c in batch) / n,
        "n": n,
        "examples": [
            {"prompt": c.example.prompt, "reference": c.example.reference, "completion": c.text, "correct": s}
            for c, s in list(zip(batch, correct, strict=True))[:3]
        ],
    }
