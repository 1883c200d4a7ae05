"""``incentive data-stats FILE_OR_TASK ...``: its options, and the run that loads the corpora, the
tokenizer and the scoring model, then writes stats.json, the plots and the HTML page (and the filtered rows
if asked)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from incentive.analysis.data_filters import FILTERS
from incentive.cli import at_least, number_in

DESCRIPTION = """Statistics of distillation data, one or more corpora side by side: token lengths of prompts,
reasoning (the <think> part of a response), answers and whole responses (count, sum, mean, median, std, IQR,
p5/p95, coefficient of variation, tail masses, span-histogram entropy), the span histogram, category and
difficulty shares by rows and by response tokens, and per-row perplexity under a scoring model. Optional
quality filters (high-frequency n-grams, missing think/answer parts, exact duplicates, overlap with
evaluation sets) run first, each reporting the rows it removes; the statistics describe the rows kept. A file
is JSON Lines, CSV or Parquet with a prompt and a response column (category and difficulty optional);
task:<name> uses the task's worked solutions as responses."""
EPILOG = "example: incentive data-stats teacher_a.jsonl teacher_b.jsonl --filter all --out data-stats/ab"


def add_parser(sub: Any, handler: Callable[[argparse.Namespace], int]) -> None:
    """Register ``data-stats`` on the command line's subparsers, run by ``handler``."""
    p = sub.add_parser(
        "data-stats",
        help="token-length, category and perplexity statistics of distillation data, with quality filters",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument("sources", nargs="+", metavar="FILE_OR_TASK", help="jsonl/csv/parquet file or task:<name>")
    p.add_argument(
        "--model", default="embedded", help="perplexity's scoring model; the tokenizer too unless --tokenizer"
    )
    p.add_argument("--tokenizer", help="tokenizer counting lengths (default: --model's), e.g. the student's")
    p.add_argument(
        "--perplexity", action=argparse.BooleanOptionalAction, default=True, help="score rows with --model"
    )
    p.add_argument("--scope", choices=["response", "full"], default="response", help="what perplexity scores")
    p.add_argument(
        "--context",
        choices=["chat", "plain"],
        default="chat",
        help="prompt before the response: the model's chat template (where it has one) or prompt + newline",
    )
    p.add_argument("--max-len", type=at_least(2), default=2048, help="longest window the scorer sees")
    p.add_argument("--stride", type=at_least(1), help="tokens between window starts (default: --max-len / 2)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="windows per scoring call")
    p.add_argument(
        "--perplexity-share",
        type=number_in(0, 1, low_open=True),
        default=1.0,
        help="score this share of the rows, picked by a hash of the prompt (same prompts in every corpus)",
    )
    p.add_argument("--prompt-field", default="prompt", help="a file's prompt column (the paper's: query)")
    p.add_argument("--response-field", default="response", help="a file's response column")
    p.add_argument("--category-field", default="category", help="a file's category column (optional)")
    p.add_argument("--difficulty-field", default="difficulty", help="a file's difficulty column (optional)")
    p.add_argument("--size", type=at_least(1), help="rows per source at most (a task's default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of task sources")
    p.add_argument("--bin-width", type=at_least(1), default=1024, help="span-histogram bin width in tokens")
    p.add_argument("--cap", type=at_least(1), default=10240, help="overflow bin start (a multiple of width)")
    p.add_argument(
        "--filter",
        dest="filters",
        nargs="+",
        action="extend",
        default=[],
        choices=[*FILTERS, "all"],
        metavar="FILTER",
        help="dedup, decontam, ngram, structure or all (dedup, decontam with --eval-set, ngram, structure), "
        "run in the order given",
    )
    p.add_argument("--ngram-n", type=at_least(1), default=20, help="n-gram length in tokens")
    p.add_argument(
        "--ngram-min-count", type=at_least(0), default=20, help="flag n-grams occurring more often than this"
    )
    p.add_argument("--dedup-on", choices=["prompt", "pair"], default="prompt", help="what repeats")
    p.add_argument(
        "--eval-set", action="append", default=[], metavar="FILE_OR_TASK", help="evaluation set; repeatable"
    )
    p.add_argument("--eval-prompt-field", default="prompt", help="an evaluation file's prompt column")
    p.add_argument("--eval-size", type=at_least(1), help="prompts per evaluation set at most")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of task evaluation sets")
    p.add_argument(
        "--embedder",
        help="also drop prompts whose embedding is close to an evaluation prompt: minilm, or MODULE:FUNCTION",
    )
    p.add_argument("--embed-threshold", type=number_in(-1, 1), default=0.9, help="cosine above which to drop")
    p.add_argument(
        "--write-filtered",
        metavar="PATH",
        help="write the kept rows as jsonl: to PATH for one source, to PATH/<name>.jsonl for several",
    )
    p.add_argument("--out", metavar="DIR", default="data-stats", help="folder of stats.json and HTML")
    p.set_defaults(func=handler)


RECORDED = (
    "perplexity", "scope", "max_len", "batch_size", "perplexity_share", "bin_width", "cap", "ngram_n",
    "ngram_min_count", "dedup_on", "eval_set", "embedder", "embed_threshold", "prompt_field", "response_field",
    "category_field", "difficulty_field", "size", "seed",
)  # fmt: skip
"""Options recorded as given in stats.json's settings."""


def filter_names(requested: Sequence[str], have_eval_sets: bool) -> tuple[str, ...]:
    """The filters to run in order, ``all`` expanded (decontam only with evaluation sets), repeats dropped."""
    names: list[str] = []
    for name in requested:
        expanded = [f for f in FILTERS if f != "decontam" or have_eval_sets] if name == "all" else [name]
        names += [f for f in expanded if f not in names]
    return tuple(names)


def run(args: argparse.Namespace) -> int:
    """The command: check the options, load, analyse, write and print the side-by-side table."""
    from incentive.analysis.data_corpus import Fields, load_corpus, load_prompts, unique_labels
    from incentive.analysis.data_filters import load_embedder
    from incentive.analysis.data_pipeline import (
        FilterSettings,
        analyse,
        comparison,
        markdown_table,
        write_filtered,
    )
    from incentive.analysis.data_report import write_outputs
    from incentive.analysis.data_stats import Bins
    from incentive.config import ConfigError
    from incentive.models import load_tokenizer

    stride = args.stride or max(1, args.max_len // 2)
    if stride > args.max_len:
        raise ConfigError(f"--stride ({stride}) must not exceed --max-len ({args.max_len})")
    if args.embedder and not args.eval_set:
        raise ConfigError("--embedder needs --eval-set (and --filter decontam or all)")
    names = filter_names(args.filters, bool(args.eval_set))
    if "decontam" in names and not args.eval_set:
        raise ConfigError("--filter decontam needs evaluation prompts: give --eval-set FILE_OR_TASK")
    try:
        bins = Bins(args.bin_width, args.cap)
    except ValueError as err:
        raise ConfigError(f"--bin-width/--cap: {err}") from err
    fields = Fields(args.prompt_field, args.response_field, args.category_field, args.difficulty_field)
    corpora = unique_labels([load_corpus(source, fields, args.size, args.seed) for source in args.sources])
    eval_prompts = tuple(
        prompt
        for source in args.eval_set
        for prompt in load_prompts(source, args.eval_prompt_field, args.eval_size, args.eval_seed)
    )
    try:
        embedder = load_embedder(args.embedder) if args.embedder else None
        filters = FilterSettings(
            names,
            args.ngram_n,
            args.ngram_min_count,
            args.dedup_on,
            eval_prompts,
            embedder,
            args.embed_threshold,
        )
    except ValueError as err:
        raise ConfigError(f"--embedder: {err}") from err
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    encode = _encoder(tokenizer)
    ppl, context = _perplexity_settings(args, stride, tokenizer, encode) if args.perplexity else (None, None)
    progress = ppl is not None
    reports = [analyse(c, encode, bins, filters, ppl, tokenizer.decode, progress) for c in corpora]
    settings = {
        "sources": [c.source for c in corpora],
        "labels": [c.label for c in corpora],
        "tokenizer": args.tokenizer or args.model,
        "model": args.model if args.perplexity else None,
        "context": context,
        "stride": stride,
        "filters": list(names),
        "eval_prompts": len(eval_prompts),
        **{key: getattr(args, key) for key in RECORDED},
    }
    stats_path, html_path = write_outputs(reports, settings, Path(args.out))
    print(markdown_table(comparison(reports)))
    for report in reports:
        for entry in report.filters:
            removed = f"removed {entry['removed']} of {report.rows} rows"
            print(f"[incentive] {report.label}: filter {entry['filter']} {removed}")
    if args.write_filtered:
        target = Path(args.write_filtered)
        for report in reports:
            path = target if len(reports) == 1 else target / f"{report.label}.jsonl"
            written = write_filtered(report.kept, path)
            print(f"[incentive] {report.label}: {len(report.kept)} kept rows -> {written}")
    print(f"[incentive] data-stats: {stats_path} and {html_path} (plots as PNG files beside it)")
    return 0


def _encoder(tokenizer: Any) -> Callable[[Sequence[str]], list[list[int]]]:
    """Batch tokenization without special tokens."""

    def encode(texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    return encode


def _perplexity_settings(
    args: argparse.Namespace, stride: int, length_tokenizer: Any, encode: Any
) -> tuple[Any, str]:
    """The scoring model, its tokenizer (the length tokenizer when they are the same) and the prompt layout;
    and the layout's name (``plain`` where the model has no chat template)."""
    from incentive.analysis.data_perplexity import context_renderer, model_scorer
    from incentive.analysis.data_pipeline import PerplexitySettings
    from incentive.models import load_tokenizer
    from incentive.training.policy import load_model_for_eval

    same = args.tokenizer in (None, args.model)
    tokenizer = length_tokenizer if same else load_tokenizer(args.model)
    context = "chat" if args.context == "chat" and tokenizer.chat_template else "plain"
    settings = PerplexitySettings(
        model_scorer(load_model_for_eval(args.model)),
        encode if same else _encoder(tokenizer),
        context_renderer(tokenizer, context),
        args.scope,
        args.max_len,
        stride,
        args.batch_size,
        args.perplexity_share,
    )
    return settings, context
