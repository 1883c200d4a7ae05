"""One corpus through ``incentive data-stats``: the chosen quality filters in order, then the length,
category and difficulty statistics and the perplexities of the rows they keep; and the side-by-side table of
several."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incentive.analysis.data_corpus import TEXT_FIELDS, Corpus, Sample
from incentive.analysis.data_filters import (
    FILTERS,
    DedupKey,
    Embedder,
    decontaminate,
    duplicate_flags,
    ngram_flags,
    ngram_frequency,
    structure_flags,
)
from incentive.analysis.data_perplexity import (
    Scope,
    TokenScorer,
    perplexities,
    perplexity_summary,
    scored_sequence,
)
from incentive.analysis.data_stats import (
    NO_GROUP,
    PAPER_BINS,
    Bins,
    group_order,
    grouped_length_stats,
    shares,
    span_histogram,
)

Encode = Callable[[Sequence[str]], list[list[int]]]
"""Texts to their token ids (no special tokens added)."""
Decode = Callable[[Sequence[int]], str]
SHOWN_ROWS = 10
"""Row numbers a filter report lists (the count covers them all)."""


@dataclass(frozen=True)
class FilterSettings:
    """Which filters run, in this order, and their parameters."""

    names: tuple[str, ...] = ()
    ngram_n: int = 20
    ngram_min_count: int = 20
    dedup_on: DedupKey = "prompt"
    eval_prompts: tuple[str, ...] = ()
    embedder: Embedder | None = None
    threshold: float = 0.9

    def __post_init__(self) -> None:
        unknown = [name for name in self.names if name not in FILTERS]
        if unknown:
            raise ValueError(f"unknown filter(s) {', '.join(unknown)}; the filters are: {', '.join(FILTERS)}")
        if "decontam" in self.names and not self.eval_prompts:
            raise ValueError("the decontam filter needs evaluation prompts (--eval-set)")


@dataclass(frozen=True)
class PerplexitySettings:
    """How perplexity is computed: the scorer and its tokenizer, the prompt layout before a response, the
    scope, the window and the share of rows scored (a fixed hash of the prompt picks them, so corpora
    answering the same prompts are scored on the same prompts)."""

    score: TokenScorer
    encode: Encode
    render: Callable[[str], str] = field(default=lambda prompt: prompt + "\n")
    scope: Scope = "response"
    max_len: int = 2048
    stride: int = 1024
    batch_size: int = 8
    share: float = 1.0

    def picks(self, prompt: str) -> bool:
        """Whether a row with this prompt is scored."""
        return self.share >= 1 or zlib.crc32(prompt.encode()) % 10_000 < self.share * 10_000


@dataclass(frozen=True)
class CorpusReport:
    """A corpus after filtering: the kept rows, what each filter removed, the statistics (``stats.json``) and
    the per-row values the plots draw."""

    label: str
    source: str
    rows: int
    kept: list[Sample]
    filters: list[dict[str, Any]]
    stats: dict[str, Any]
    response_lengths: list[int]
    perplexity: list[float | None]


def analyse(
    corpus: Corpus,
    encode: Encode,
    bins: Bins = PAPER_BINS,
    filters: FilterSettings = FilterSettings(),
    ppl: PerplexitySettings | None = None,
    decode: Decode | None = None,
    progress: bool = False,
) -> CorpusReport:
    """Filter ``corpus``, then measure what is kept (perplexity only with ``ppl``)."""
    samples = corpus.samples
    response_ids = encode([s.response for s in samples])
    keep, reports = apply_filters(samples, response_ids, filters, decode)
    kept = [s for s, k in zip(samples, keep, strict=True) if k]
    kept_ids = [ids for ids, k in zip(response_ids, keep, strict=True) if k]
    categories = [s.category for s in kept]
    lengths = _lengths(kept, encode, kept_ids)
    response = [len(ids) for ids in kept_ids]
    groups = group_rows(categories)
    stats: dict[str, Any] = {
        "label": corpus.label,
        "source": corpus.source,
        "rows": len(samples),
        "kept": len(kept),
        "filters": reports,
        "lengths": {name: grouped_length_stats(lengths[name], categories, bins) for name in TEXT_FIELDS},
        "histogram": {
            "field": "response",
            "bins": bins.labels(),
            "all": span_histogram(response, bins),
            "by_category": {
                name: span_histogram([response[i] for i in rows], bins) for name, rows in groups.items()
            },
        },
        "category": {"instance": shares(categories), "token": shares(categories, response)},
        "difficulty": None,
        "perplexity": None,
    }
    difficulties = [s.difficulty for s in kept]
    if any(d is not None for d in difficulties):
        stats["difficulty"] = {"instance": shares(difficulties), "token": shares(difficulties, response)}
    values: list[float | None] = [None] * len(kept)
    if ppl is not None:
        stats["perplexity"], values = _perplexity(kept, kept_ids, encode, ppl, progress)
    return CorpusReport(corpus.label, corpus.source, len(samples), kept, reports, stats, response, values)


def _perplexity(
    kept: list[Sample], kept_ids: list[list[int]], encode: Encode, ppl: PerplexitySettings, progress: bool
) -> tuple[dict[str, Any], list[float | None]]:
    """The perplexity block of the statistics (over all scored rows and per category) and each kept row's
    perplexity (None where not scored)."""
    picked = [i for i, s in enumerate(kept) if ppl.picks(s.prompt)]
    contexts = ppl.encode([ppl.render(kept[i].prompt) for i in picked])
    if ppl.encode is encode:
        responses = [kept_ids[i] for i in picked]
    else:
        responses = ppl.encode([kept[i].response for i in picked])
    sequences = [scored_sequence(c, r, ppl.scope) for c, r in zip(contexts, responses, strict=True)]
    results = perplexities(sequences, ppl.score, ppl.max_len, ppl.stride, ppl.batch_size, progress)
    values: list[float | None] = [None] * len(kept)
    for i, result in zip(picked, results, strict=True):
        values[i] = result.perplexity
    groups = group_rows([kept[i].category for i in picked])
    block = {
        "share": ppl.share,
        "rows_scored": len(picked),
        "all": perplexity_summary(results),
        "by_category": {
            name: perplexity_summary([results[i] for i in rows]) for name, rows in groups.items()
        },
    }
    return block, values


def group_rows(keys: Sequence[str | None]) -> dict[str, list[int]]:
    """The row indices of each group, largest group first (see :func:`group_order`)."""
    rows: dict[str, list[int]] = {name: [] for name in group_order(keys)}
    for index, key in enumerate(keys):
        rows[NO_GROUP if key is None else key].append(index)
    return rows


def apply_filters(
    samples: Sequence[Sample],
    response_ids: Sequence[Sequence[int]],
    settings: FilterSettings,
    decode: Decode | None = None,
) -> tuple[list[bool], list[dict[str, Any]]]:
    """Run the filters in order, each on the rows the ones before it kept; which rows stay, and per filter how
    many rows it removed, the first row numbers and its details."""
    keep = [True] * len(samples)
    reports = []
    for name in settings.names:
        alive = [i for i, k in enumerate(keep) if k]
        flags, details = _run_filter(
            name, [samples[i] for i in alive], [response_ids[i] for i in alive], settings, decode
        )
        removed = [i for i, flag in zip(alive, flags, strict=True) if flag]
        for i in removed:
            keep[i] = False
        rows = [samples[i].row for i in removed]
        reports.append({"filter": name, "removed": len(removed), "rows": rows[:SHOWN_ROWS], **details})
    return keep, reports


def _run_filter(
    name: str,
    samples: list[Sample],
    response_ids: list[Sequence[int]],
    settings: FilterSettings,
    decode: Decode | None,
) -> tuple[list[bool], dict[str, Any]]:
    """One filter's flags over ``samples`` and what it reports beside the count."""
    if name == "structure":
        return structure_flags(samples), {}
    if name == "dedup":
        return duplicate_flags(samples, settings.dedup_on), {"on": settings.dedup_on}
    if name == "decontam":
        reasons = decontaminate(
            [s.prompt for s in samples], settings.eval_prompts, settings.embedder, settings.threshold
        )
        exact = sum(reason == "exact" for reason in reasons)
        details = {"exact": exact, "embedding": sum(r is not None for r in reasons) - exact}
        return [r is not None for r in reasons], details
    n, min_count = settings.ngram_n, settings.ngram_min_count
    flagged = ngram_frequency(response_ids, n, min_count)
    top = [
        {"count": count, **({"text": decode(list(gram))} if decode else {})}
        for gram, count in list(flagged.items())[:3]
    ]
    details = {"n": n, "min_count": min_count, "ngrams": len(flagged), "top": top}
    return ngram_flags(flagged, response_ids, n), details


def _lengths(
    samples: Sequence[Sample], encode: Encode, response_ids: Sequence[Sequence[int]]
) -> dict[str, list[int | None]]:
    """Token length of each text of each row, None where the row has no such part."""
    out: dict[str, list[int | None]] = {"response": [len(ids) for ids in response_ids]}
    for name in TEXT_FIELDS:
        if name == "response":
            continue
        texts = [s.text(name) for s in samples]
        present = [t for t in texts if t is not None]
        counts = iter(len(ids) for ids in encode(present)) if present else iter(())
        out[name] = [None if t is None else next(counts) for t in texts]
    return out


COMPARISON = (
    ("rows", "rows", "d"),
    ("kept", "kept", "d"),
    ("response mean", ("lengths", "response", "all", "mean"), ".1f"),
    ("median", ("lengths", "response", "all", "median"), ".1f"),
    ("std", ("lengths", "response", "all", "std"), ".1f"),
    ("IQR", ("lengths", "response", "all", "iqr"), ".1f"),
    ("CV", ("lengths", "response", "all", "cv"), ".3f"),
    ("P(short)", ("lengths", "response", "all", "share_short"), ".3f"),
    ("P(long)", ("lengths", "response", "all", "share_long"), ".3f"),
    ("bin entropy", ("lengths", "response", "all", "bin_entropy"), ".3f"),
    ("reasoning mean", ("lengths", "reasoning", "all", "mean"), ".1f"),
    ("answer mean", ("lengths", "answer", "all", "mean"), ".1f"),
    ("PPL mean", ("perplexity", "all", "mean"), ".3f"),
    ("PPL median", ("perplexity", "all", "median"), ".3f"),
    ("PPL token-weighted", ("perplexity", "all", "token_weighted"), ".3f"),
    ("PPL rows", ("perplexity", "all", "count"), "d"),
)
"""The side-by-side table: heading, where in a corpus's stats, format."""


def comparison(reports: Sequence[CorpusReport]) -> list[dict[str, Any]]:
    """One row of headline numbers per corpus (``COMPARISON``), None where a number is absent."""
    rows = []
    for report in reports:
        row: dict[str, Any] = {"corpus": report.label}
        for heading, path, _ in COMPARISON:
            node: Any = report.stats
            for key in (path,) if isinstance(path, str) else path:
                node = node.get(key) if isinstance(node, dict) else None
            row[heading] = node
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a markdown table, one column per corpus."""
    labels = [str(row["corpus"]) for row in rows]
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for heading, _, spec in COMPARISON:
        cells = ["–" if row[heading] is None else format(row[heading], spec) for row in rows]
        lines.append(f"| {heading} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_filtered(samples: Sequence[Sample], path: Path) -> Path:
    """The kept rows as JSON Lines (each row as it was read), parent folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample.record, ensure_ascii=False, default=str) + "\n")
    return path
