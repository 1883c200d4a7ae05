"""Held-out evaluation: accuracy by a chosen verifier, strict and regardless of format, with 95 % intervals,
unbiased pass@k, format rate, lengths, per-domain and per-difficulty breakdowns, every completion saved per
prompt, and the paired comparison of two such evals; judged apart from the training rewards."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.data.example import Example
from incentive.engines import CachedEngine, Engine, SamplingParams
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.verifier import RuleVerifier, extract_answer
from incentive.rewards.wordings import AcceptedWordings
from incentive.rollout.types import Completion, RolloutBatch
from incentive.stats import paired_compare, rate_interval
from incentive.templates import Parsed, TagFormat, Template

VERIFIERS = ("rule", "accepted_wordings", "tinyv", "general_reasoner")


def build_verifier(name: str, judge: str = "embedded", judge_max_new_tokens: int | None = None) -> Reward:
    """The rule verifier, the accepted-wordings judge, or one of the LLM-judge verifiers with ``judge`` as its
    model (loaded on first use)."""
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier '{name}'; choose one of {', '.join(VERIFIERS)}")
    if name == "rule":
        return RuleVerifier()
    if name == "accepted_wordings":
        return AcceptedWordings()
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


_TAG = re.compile(r"</?[A-Za-z_][\w-]*>")
_MARKER = re.compile(r"\banswer\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def lenient_answer(text: str, tagged: str | None, answer_tag: str = "answer") -> str | None:
    """The answer a completion gives whatever its format, for "correct regardless of format": the verifier's
    extraction (answer block, else last \\boxed{}), else the text after an unclosed answer tag, else what follows
    the last "answer:" / "answer is", else the last number, else the last non-empty line (tags removed)."""
    found = extract_answer(text, tagged)
    if found is not None:
        return found
    opening = f"<{answer_tag}>"
    if opening in text:
        tail = _TAG.sub(" ", text.rsplit(opening, 1)[1]).strip()
        if tail:
            return tail
    plain = _TAG.sub("\n", text)
    marked = [m.strip().rstrip(".").strip() for m in _MARKER.findall(plain)]
    if marked and marked[-1]:
        return marked[-1]
    numbers = _NUMBER.findall(plain)
    if numbers:
        return numbers[-1]
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    return lines[-1] if lines else None


@dataclass(frozen=True)
class Lenient:
    """Correctness regardless of format: each completion's lenient answer and the verifier's verdict on it."""

    answers: list[str | None]
    correct: list[bool]


def judge_lenient(
    batch: RolloutBatch,
    parsed: Sequence[Parsed],
    correct: Sequence[bool],
    verifier: Reward,
    tokenizer: PreTrainedTokenizerBase,
    tags: TagFormat,
) -> Lenient:
    """Run ``verifier`` again on the lenient answers of the completions whose format hides their answer, each
    rewritten as the template's canonical completion; the others keep their verdict (same answer, same check),
    and a strict pass always counts."""
    answers = [lenient_answer(c.text, p.answer, tags.answer) for c, p in zip(batch, parsed, strict=True)]
    redo = [
        i
        for i, (c, p) in enumerate(zip(batch, parsed, strict=True))
        if answers[i] is not None and extract_answer(c.text, p.answer) is None
    ]
    lenient = list(correct)
    if redo:
        rewritten = RolloutBatch(
            [replace(batch.completions[i], text=tags.render("", answers[i] or "")) for i in redo]
        )
        verdicts = _correct(verifier(rewritten, RewardContext(tokenizer, tags)))
        for i, ok in zip(redo, verdicts, strict=True):
            lenient[i] = lenient[i] or ok
    return Lenient(answers, lenient)


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
    """Generate ``params.n`` samples per example and judge them (rule verifier by default), strictly and regardless
    of format; see :func:`summarize_eval`. ``progress`` shows a bar (stderr) over the prompts with an ETA, then
    while the verifier judges; ``engine`` (default: the cached engine, whose greedy output equals HF ``generate``)
    is how completions are sampled, e.g. a run's own engine with its tools."""
    engine = engine or CachedEngine(model, tokenizer, batch_size=batch_size)
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
        parsed = ctx.parsed(batch)
        lenient = judge_lenient(batch, parsed, _correct(result), verifier, tokenizer, template.tags)
    return summarize_eval(batch, result, parsed, ks, lenient)


def _correct(result: RewardResult) -> list[bool]:
    """The verifier's ``correct`` extra when it has one, else a full score."""
    return [bool(c) for c in result.extras.get("correct", [s >= 1.0 for s in result.scores])]


def summarize_eval(
    batch: RolloutBatch,
    result: RewardResult,
    parsed: Sequence[Parsed],
    ks: Sequence[int] = (1,),
    lenient: Lenient | None = None,
) -> dict[str, Any]:
    """Accuracy (share of correct samples, strict: the answer where the format puts it) and correctness regardless
    of format (``lenient``; without it, the strict verdicts), each with a 95 % interval over prompts, pass@k (mean
    over prompts with at least k samples), format and answer rates, lengths, truncation, breakdowns by domain and
    difficulty, three sample completions and, under ``per_prompt``, every completion of every prompt."""
    correct = _correct(result)
    answers = [extract_answer(c.text, p.answer) for c, p in zip(batch, parsed, strict=True)]
    lenient = lenient or Lenient(answers, correct)
    lengths = sorted(c.length for c in batch)
    n = len(batch)
    finite = [s for s in result.scores if math.isfinite(s)]
    groups = list(batch.groups().values())
    formatted = [p.strict for p in parsed]
    intervals = {
        key: rate_interval([(sum(flags[i] for i in g), len(g)) for g in groups])
        for key, flags in (
            ("accuracy", correct),
            ("accuracy_lenient", lenient.correct),
            ("format_rate", formatted),
        )
    }
    verdicts = [
        {
            "text": c.text,
            "answer": answers[i],
            "answer_lenient": lenient.answers[i],
            "correct": correct[i],
            "correct_lenient": lenient.correct[i],
            "format_ok": formatted[i],
            "score": result.scores[i] if math.isfinite(result.scores[i]) else None,
            "reason": result.reasons[i],
            "length": c.length,
            "truncated": c.truncated,
        }
        for i, c in enumerate(batch)
    ]
    return {
        "accuracy": intervals["accuracy"].rate,
        "accuracy_ci": [intervals["accuracy"].low, intervals["accuracy"].high],
        "accuracy_lenient": intervals["accuracy_lenient"].rate,
        "accuracy_lenient_ci": [intervals["accuracy_lenient"].low, intervals["accuracy_lenient"].high],
        "score_mean": sum(finite) / len(finite) if finite else math.nan,
        **_pass_at(groups, correct, ks),
        "format_rate": intervals["format_rate"].rate,
        "format_rate_ci": [intervals["format_rate"].low, intervals["format_rate"].high],
        "ci_method": intervals["accuracy"].method,
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
            {"prompt": c.example.prompt, "reference": c.example.reference, **verdict}
            for c, verdict in list(zip(batch, verdicts, strict=True))[:3]
        ],
        "per_prompt": [
            _prompt_record(batch.completions[g[0]].example, g[0], [verdicts[i] for i in g]) for g in groups
        ],
    }


def _prompt_record(example: Example, first: int, completions: list[dict[str, Any]]) -> dict[str, Any]:
    """One prompt's line of the completions file; ``first`` (its first completion's index) stands in for a
    missing id."""
    return {
        "id": example.id or f"#{first}",
        "prompt": example.prompt,
        "reference": example.reference,
        "domain": example.domain,
        "difficulty": example.difficulty,
        "completions": completions,
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


HEADLINE = (
    ("accuracy", "accuracy (strict)"),
    ("accuracy_lenient", "correct regardless of format"),
    ("format_rate", "format rate"),
)
"""The rates reported with a 95 % interval, and their labels."""


def headline(result: dict[str, Any]) -> list[str]:
    """Human-readable lines: strict accuracy, correctness regardless of format and format rate with their 95 %
    intervals, then pass@k, then how the intervals were computed."""
    lines = []
    for key, label in HEADLINE:
        if key in result:
            low, high = result[f"{key}_ci"]
            lines.append(f"{label:<30} {result[key]:6.1%}   95% CI {low:.1%} to {high:.1%}")
    lines += [f"{key:<30} {result[key]:6.1%}" for key in _pass_keys(result)]
    lines.append(f"intervals: {result['ci_method']}; {result['prompts']} prompts, {result['n']} completions")
    return lines


def markdown_report(result: dict[str, Any], title: str = "Evaluation") -> str:
    """The headline numbers (rates with their 95 % intervals) and both breakdowns as markdown tables."""
    heads = [k for k in ("accuracy", "accuracy_lenient", "score_mean") if k in result] + _pass_keys(result)
    heads += ["format_rate", "answer_rate", "length_mean", "length_p50", "length_p90", "length_max"]
    heads += ["truncated_share", "prompts", "n"]
    lines = [f"# {title}", ""]
    setting = [
        f"{k}: `{result[k]}`"
        for k in ("model", "data", "verifier", "samples", "temperature", "seed", "sampling_seed")
        if k in result
    ]
    if setting:
        lines += [" · ".join(setting), ""]
    lines += ["| metric | value | 95% CI |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(result[k])} | {_fmt_ci(result.get(f'{k}_ci'))} |" for k in heads]
    if "ci_method" in result:
        lines += ["", f"Intervals: {result['ci_method']}."]
    lines.append("")
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


def completions_path(json_path: Path) -> Path:
    """Where the completions of the eval saved at ``json_path`` go: ``x.json`` → ``x.completions.jsonl``."""
    return json_path.with_suffix(".completions.jsonl")


def write_completions(per_prompt: Sequence[dict[str, Any]], path: Path) -> None:
    """One JSON line per prompt (id, prompt, reference, and each completion with its verdicts); written to a
    temporary file first, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in per_prompt))
    tmp.replace(path)


def write_report(result: dict[str, Any], out: Path, title: str = "Evaluation") -> tuple[Path, Path, Path]:
    """``out`` ending in .json: that file, a .md and a .completions.jsonl beside it; otherwise a folder with
    eval.json, eval.md and eval.completions.jsonl (every completion per prompt, see :func:`write_completions`)."""
    json_path = out if out.suffix == ".json" else out / "eval.json"
    md_path = json_path.with_suffix(".md")
    lines_path = completions_path(json_path)
    write_completions(result.get("per_prompt", []), lines_path)
    summary = {k: v for k, v in result.items() if k != "per_prompt"}
    summary["completions_file"] = lines_path.name
    json_path.write_text(json.dumps(summary, indent=2, default=str))
    md_path.write_text(markdown_report(result, title))
    return json_path, md_path, lines_path


class EvalFileError(ValueError):
    """An eval output that cannot be compared: missing, malformed, or over other prompts than its partner."""


COMPARED = {
    "strict": ("correct", "accuracy (strict)"),
    "lenient": ("correct_lenient", "correct regardless of format"),
    "format": ("format_ok", "format rate"),
}
"""compare's metrics: the completion field that counts, and the metric's label."""


def read_completions(path: Path) -> list[dict[str, Any]]:
    """The per-prompt records of an eval output: its completions file, an eval .json beside one, or a folder."""
    lines_path = path / "eval.completions.jsonl" if path.is_dir() else path
    if lines_path.suffix == ".json":
        lines_path = completions_path(lines_path)
    if not lines_path.is_file():
        raise EvalFileError(
            f"{lines_path}: not found (compare reads the eval.completions.jsonl that incentive eval --out writes)"
        )
    records = []
    for number, line in enumerate(lines_path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            if not isinstance(record["id"], str) or not record["completions"]:
                raise ValueError("no id or no completions")
            missing = {f for c in record["completions"] for f, _ in COMPARED.values() if f not in c}
            if missing:
                raise ValueError(f"completions without {', '.join(sorted(missing))}")
        except (ValueError, KeyError, TypeError) as err:
            raise EvalFileError(f"{lines_path}, line {number}: not a per-prompt eval record ({err})") from err
        records.append(record)
    if not records:
        raise EvalFileError(f"{lines_path}: no prompts")
    return records


def compare(path_a: Path, path_b: Path, metric: str = "strict") -> dict[str, Any]:
    """Paired comparison of two evals over the same prompts, matched by prompt id (see
    :func:`incentive.stats.paired_compare`); EvalFileError when the prompts differ."""
    field, label = COMPARED[metric]
    a, b = _by_id(path_a, read_completions(path_a)), _by_id(path_b, read_completions(path_b))
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        example = f"e.g. {(only_a or only_b)[0]!r}"
        raise EvalFileError(
            f"{path_a} and {path_b} are not over the same prompts: {len(only_a)} prompt ids only in the first, "
            f"{len(only_b)} only in the second ({example})"
        )
    for key in sorted(a):
        for part in ("prompt", "reference"):
            if a[key][part] != b[key][part]:
                raise EvalFileError(f"{path_a} and {path_b} differ in the {part} of prompt {key!r}")
    ids = sorted(a)
    counts = [[_count(side[i]["completions"], field) for i in ids] for side in (a, b)]
    paired = paired_compare(*counts)
    return {
        "a": str(path_a),
        "b": str(path_b),
        "metric": metric,
        "label": label,
        "prompts": paired.prompts,
        "completions_a": sum(m for _, m in counts[0]),
        "completions_b": sum(m for _, m in counts[1]),
        "rate_a": paired.rate_a,
        "rate_b": paired.rate_b,
        "diff": paired.diff,
        "ci": [paired.low, paired.high],
        "ci_method": paired.interval,
        "b_better": paired.b_better,
        "a_better": paired.a_better,
        "p_value": paired.p_value,
        "test": paired.test,
        "significant": paired.significant,
    }


def _count(completions: list[dict[str, Any]], field: str) -> tuple[int, int]:
    """(successes, samples) of one prompt's completions under ``field``."""
    return sum(bool(c[field]) for c in completions), len(completions)


def _by_id(path: Path, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records by prompt id; EvalFileError on a repeated id (it could not be paired)."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["id"] in out:
            raise EvalFileError(f"{path}: prompt id {record['id']!r} appears twice")
        out[record["id"]] = record
    return out


def compare_lines(result: dict[str, Any]) -> list[str]:
    """The comparison in words: both rates, B − A with its 95 % interval, the paired test and its verdict."""
    label, width = result["label"], max(len(result["a"]), len(result["b"]))
    verdict = (
        f"significant at 5 %: B's {label} is {'higher' if result['diff'] > 0 else 'lower'} than A's"
        if result["significant"]
        else "not significant at 5 %: no difference shown"
    )
    low, high = result["ci"]
    return [
        f"A: {result['a']:<{width}}  {label} {result['rate_a']:6.1%}  ({result['completions_a']} completions)",
        f"B: {result['b']:<{width}}  {label} {result['rate_b']:6.1%}  ({result['completions_b']} completions)",
        f"{result['prompts']} prompts matched by id",
        f"B - A: {result['diff'] * 100:+.1f} points, 95% CI {low * 100:+.1f} to {high * 100:+.1f} points "
        f"({result['ci_method']})",
        f"{result['test']}: B better on {result['b_better']} prompts, A better on {result['a_better']}, "
        f"p = {result['p_value']:.3g}",
        f"The difference is {verdict} (p {'<' if result['significant'] else '>='} 0.05).",
    ]


def _pass_keys(result: dict[str, Any]) -> list[str]:
    return sorted((k for k in result if k.startswith("pass@")), key=lambda k: int(k[5:]))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt_ci(interval: Sequence[float] | None) -> str:
    return "" if interval is None else f"{interval[0]:.4g} to {interval[1]:.4g}"
