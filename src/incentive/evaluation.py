"""Held-out evaluation: accuracy by a chosen verifier, unbiased pass@k, format rate, lengths, and per-domain and
per-difficulty breakdowns, judged apart from the training rewards."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.data.example import Example
from incentive.engines import Engine, HFEngine, SamplingParams
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.verifier import RuleVerifier
from incentive.rollout.types import Completion, RolloutBatch
from incentive.templates import Parsed, Template

VERIFIERS = ("rule", "tinyv", "general_reasoner")


def build_verifier(name: str, judge: str = "embedded", judge_max_new_tokens: int | None = None) -> Reward:
    """The rule verifier, or one of the LLM-judge verifiers with ``judge`` as its model (loaded on first use)."""
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier '{name}'; choose one of {', '.join(VERIFIERS)}")
    if name == "rule":
        return RuleVerifier()
    args: dict[str, Any] = {"model": judge}
    if judge_max_new_tokens is not None:
        args["max_new_tokens"] = judge_max_new_tokens
    return REWARDS.get(name)(**args)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 − C(n−c, k) / C(n, k), the chance that k of n samples, c of them
    correct, include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    examples: Sequence[Example],
    params: SamplingParams,
    batch_size: int = 32,
    verifier: Reward | None = None,
    ks: Sequence[int] = (1,),
    progress: bool = True,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Generate ``params.n`` samples per example and judge them (rule verifier by default); see :func:`summarize_eval`.
    ``progress`` shows a bar (stderr) over the prompts with an ETA, then while the verifier judges; ``engine``
    (default HF generate) is how completions are sampled, e.g. with tool calls."""
    engine = engine or HFEngine(model, tokenizer, batch_size=batch_size)
    per_call = max(1, batch_size // params.n)
    completions: list[Completion] = []
    verifier = verifier or RuleVerifier()
    with tqdm(total=len(examples), desc="eval", unit="prompt", leave=False, disable=not progress) as bar:
        bar.set_postfix_str("generating")
        for start in range(0, len(examples), per_call):
            chunk = examples[start : start + per_call]
            prompts = [template.render(e, tokenizer) for e in chunk]
            ids = list(range(start, start + len(chunk)))
            completions += engine.generate(chunk, prompts, ids, params).completions
            bar.update(len(chunk))
        bar.set_postfix_str(f"judging {len(completions)} completions ({type(verifier).__name__})")
        batch = RolloutBatch(completions)
        ctx = RewardContext(tokenizer, template.tags)
        result = verifier(batch, ctx)
    return summarize_eval(batch, result, ctx.parsed(batch), ks)


def summarize_eval(
    batch: RolloutBatch, result: RewardResult, parsed: Sequence[Parsed], ks: Sequence[int] = (1,)
) -> dict[str, Any]:
    """Accuracy (share of correct samples), pass@k (mean over prompts with at least k samples), format and answer
    rates, lengths, truncation, breakdowns by domain and difficulty, and three sample completions. "Correct" is the
    verifier's ``correct`` extra when it has one, else a full score."""
    correct = [bool(c) for c in result.extras.get("correct", [s >= 1.0 for s in result.scores])]
    lengths = sorted(c.length for c in batch)
    n = len(batch)
    finite = [s for s in result.scores if math.isfinite(s)]
    groups = list(batch.groups().values())
    return {
        "accuracy": sum(correct) / n,
        "score_mean": sum(finite) / len(finite) if finite else math.nan,
        **_pass_at(groups, correct, ks),
        "format_rate": sum(p.strict for p in parsed) / n,
        "answer_rate": sum(p.answer is not None for p in parsed) / n,
        "length_mean": sum(lengths) / n,
        "length_p50": _percentile(lengths, 0.5),
        "length_p90": _percentile(lengths, 0.9),
        "length_max": lengths[-1],
        "truncated_share": sum(c.truncated for c in batch) / n,
        "n": n,
        "prompts": len(groups),
        "by_domain": _breakdown(batch, groups, correct, ks, lambda e: e.domain or "(none)"),
        "by_difficulty": _breakdown(
            batch, groups, correct, ks, lambda e: "(none)" if e.difficulty is None else f"{e.difficulty:g}"
        ),
        "examples": [
            {
                "prompt": c.example.prompt,
                "reference": c.example.reference,
                "completion": c.text,
                "correct": ok,
                "score": s,
                "reason": r,
            }
            for c, ok, s, r in list(zip(batch, correct, result.scores, result.reasons, strict=True))[:3]
        ],
    }


def _pass_at(groups: list[list[int]], correct: list[bool], ks: Sequence[int]) -> dict[str, float]:
    out = {}
    for k in ks:
        values = [pass_at_k(len(g), sum(correct[i] for i in g), k) for g in groups if len(g) >= k]
        if values:
            out[f"pass@{k}"] = sum(values) / len(values)
    return out


def _breakdown(
    batch: RolloutBatch,
    groups: list[list[int]],
    correct: list[bool],
    ks: Sequence[int],
    key: Callable[[Example], str],
) -> dict[str, dict[str, Any]]:
    buckets: dict[str, list[list[int]]] = {}
    for group in groups:
        buckets.setdefault(key(batch.completions[group[0]].example), []).append(group)
    out = {}
    for name in sorted(buckets):
        members = buckets[name]
        indices = [i for g in members for i in g]
        out[name] = {
            "prompts": len(members),
            "n": len(indices),
            "accuracy": sum(correct[i] for i in indices) / len(indices),
            **_pass_at(members, correct, ks),
        }
    return out


def _percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an ascending sequence."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def markdown_report(result: dict[str, Any], title: str = "Evaluation") -> str:
    """The headline numbers and both breakdowns as markdown tables."""
    heads = [k for k in ("accuracy", "score_mean") if k in result] + _pass_keys(result)
    heads += ["format_rate", "answer_rate", "length_mean", "length_p50", "length_p90", "length_max"]
    heads += ["truncated_share", "prompts", "n"]
    lines = [f"# {title}", ""]
    setting = [
        f"{k}: `{result[k]}`" for k in ("model", "data", "verifier", "samples", "temperature") if k in result
    ]
    if setting:
        lines += [" · ".join(setting), ""]
    lines += ["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(result[k])} |" for k in heads), ""]
    for section in ("by_domain", "by_difficulty"):
        rows = result.get(section) or {}
        if not rows:
            continue
        cols = ["prompts", "n", "accuracy", *_pass_keys({k: 0 for r in rows.values() for k in r})]
        lines += [f"## {section.replace('_', ' ')}", "", f"| {section[3:]} | " + " | ".join(cols) + " |"]
        lines += ["|---" * (len(cols) + 1) + "|"]
        lines += [
            f"| {name} | " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for name, r in rows.items()
        ]
        lines.append("")
    return "\n".join(lines)


def write_report(result: dict[str, Any], out: Path, title: str = "Evaluation") -> tuple[Path, Path]:
    """``out`` ending in .json: that file and a .md beside it; otherwise a folder with eval.json and eval.md."""
    json_path = out if out.suffix == ".json" else out / "eval.json"
    md_path = json_path.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, default=str))
    md_path.write_text(markdown_report(result, title))
    return json_path, md_path


def _pass_keys(result: dict[str, Any]) -> list[str]:
    return sorted((k for k in result if k.startswith("pass@")), key=lambda k: int(k[5:]))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
