"""Distillation-source statistics at toy scale: three "teachers" answer the same 200 prompts correctly in
different styles, and ``incentive data-stats`` compares their corpora.

    OMP_NUM_THREADS=1 .venv/bin/python bench/data_stats_study.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/data_stats_study.py --corpora /tmp/corpora  # keep the jsonl

The prompts are 100 ``task:chain_sum`` sums (2 to 6 terms of 2 or 3 digits) and 100 ``task:freeform``
questions (weekday, clock, compare, count). Each teacher writes the task's worked solution in its own style,
always with the right answer: ``concise`` (the steps only), ``verbose`` (restates the question, comments on
every step, re-checks every step) and ``mixed`` (a one-line reasoning on easy prompts, the steps on medium
ones, the verbose style with two checks on hard ones; difficulty is the tertile of the worked solution's
length). The same 16 defects go into every corpus, 4 of each kind, so the filters have something known to
find: 4 prompts copied from the evaluation set (50 other chain_sum sums), 4 responses cut off inside the
reasoning, 4 with a reasoning stuck in a loop and 4 duplicated rows. Perplexity is under the embedded 135M
model, response only, after the chat-formatted prompt, for the half of the prompts a hash picks.

Writes, under --out (default bench/results/data_stats_study): what ``incentive data-stats --out`` writes
(stats.json, data-stats.html and its PNGs), table.md (the side-by-side table and, per filter and teacher, the
rows removed against the defects injected) and study.json (the same, with the settings).
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from incentive.analysis.data_corpus import Corpus, Sample, make_sample
from incentive.analysis.data_filters import FILTERS
from incentive.analysis.data_perplexity import context_renderer, model_scorer
from incentive.analysis.data_pipeline import (
    CorpusReport,
    FilterSettings,
    PerplexitySettings,
    analyse,
    comparison,
    markdown_table,
    write_filtered,
)
from incentive.analysis.data_report import write_outputs
from incentive.analysis.data_stats import Bins
from incentive.data import DataConfig, Example, load_examples
from incentive.data.solutions import WORKED_SOLUTIONS
from incentive.models import load_tokenizer
from incentive.training.policy import load_model_for_eval

ROOT = Path(__file__).resolve().parents[1]
MODEL = "embedded"
PROMPTS_PER_TASK = 100
CHAIN_SUM_ARGS = {"min_terms": 2, "max_terms": 6, "min_digits": 2, "max_digits": 3}
"""Two- and three-digit terms: with one-digit terms, different seeds share prompts (natural duplicates and
contamination), which would blur the check of the filters against the defects injected."""
FREEFORM_ARGS = {"max_days": 30, "days_back": True, "max_hours": 30, "max_items": 10, "distinct": True}
SEED = 11
EVAL_SEED = 10_000
"""Far from SEED: reasoning-gym draws item k of a task from seed + k, so nearby seeds share prompts."""
EVAL_SIZE = 50
DEFECTS_PER_KIND = 4
LOOP_REPEATS = 12
BINS = Bins(32, 320)
"""The paper's bins (1024 tokens wide, 10240+ overflow) scaled down 32 times to these short solutions."""
MAX_LEN, STRIDE, BATCH = 1024, 512, 8
PPL_SHARE = 0.5
"""Perplexity of about half the prompts (the same in every corpus), to keep the run to a few minutes."""
STYLES = ("concise", "verbose", "mixed")


@dataclass(frozen=True)
class Item:
    """One prompt with its worked steps, correct answer, category and difficulty."""

    prompt: str
    steps: list[str]
    answer: str
    category: str
    difficulty: str = ""


INTROS = (
    "Let me read the question carefully: {q}",
    "The problem asks: {q}",
    "Okay, so the question is: {q}",
    "I need to answer this: {q}",
    "Here is what is being asked. {q}",
)
PLANS = (
    "I will work through it one step at a time and then check my work.",
    "My plan is to go step by step and verify at the end.",
    "Let me solve it carefully, one piece at a time.",
    "I should be systematic here and not skip anything.",
)
OPENERS = ("First,", "Next,", "Then,", "After that,", "Now,", "Continuing,", "Moving on,")
REMARKS = (
    "That looks right.",
    "Good, that part is done.",
    "Nothing tricky there.",
    "I will keep that in mind.",
    "So far so good.",
    "That seems consistent.",
)
CHECKS = (
    "Let me double-check everything from the start.",
    "Before answering, I will verify each step again.",
    "To be safe, I will go over the steps once more.",
    "Let me make sure I did not slip anywhere.",
)
VERIFY = ("Re-checking:", "Once more:", "Verifying:", "Checking again:")
CONCLUDE = (
    "So the final answer is: {a}.",
    "Therefore the answer must be: {a}.",
    "All the checks agree, so the answer is: {a}.",
    "That settles it: {a}.",
)
LOOP = "Wait, let me add that up again to be sure."


def think_answer(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"


def concise(item: Item, rng: random.Random) -> str:
    """The worked steps as they are."""
    return think_answer("\n".join(item.steps), item.answer)


def verbose(item: Item, rng: random.Random, checks: int = 1) -> str:
    """The question restated, a plan, every step opened and commented on, ``checks`` passes of re-checking
    every step, and a conclusion; phrasings drawn at random so that the text is not one template."""
    lines = [rng.choice(INTROS).format(q=item.prompt), rng.choice(PLANS)]
    for step in item.steps:
        lines.append(f"{rng.choice(OPENERS)} {step[:1].lower()}{step[1:]} {rng.choice(REMARKS)}")
    for _ in range(checks):
        lines.append(rng.choice(CHECKS))
        lines += [f"{rng.choice(VERIFY)} {step}" for step in item.steps]
    lines.append(rng.choice(CONCLUDE).format(a=item.answer.rstrip(".")))
    return think_answer("\n".join(lines), item.answer)


def mixed(item: Item, rng: random.Random) -> str:
    """Length follows difficulty: one line on easy prompts, the steps on medium ones, verbose with two checks
    on hard ones."""
    if item.difficulty == "easy":
        return think_answer(item.steps[-1], item.answer)
    if item.difficulty == "medium":
        return concise(item, rng)
    return verbose(item, rng, checks=2)


WRITERS: dict[str, Callable[[Item, random.Random], str]] = {
    "concise": concise,
    "verbose": verbose,
    "mixed": mixed,
}


def items(source: str, size: int, seed: int, task_args: dict) -> list[Item]:
    """A task's prompts with their worked steps (one per line of the worked solution)."""
    examples = load_examples(DataConfig(source=source, size=size, seed=seed, task_args=task_args)).examples
    return [to_item(example) for example in examples]


def to_item(example: Example) -> Item:
    steps = WORKED_SOLUTIONS.get(str(example.metadata["task"]))(example).splitlines()
    return Item(example.prompt, steps, example.reference, str(example.domain))


def with_difficulty(pool: list[Item]) -> list[Item]:
    """Easy, medium or hard: the tertile of the worked solution's length in characters."""
    ranked = sorted(range(len(pool)), key=lambda i: len("\n".join(pool[i].steps)))
    level = {index: ("easy", "medium", "hard")[3 * rank // len(pool)] for rank, index in enumerate(ranked)}
    return [Item(it.prompt, it.steps, it.answer, it.category, level[i]) for i, it in enumerate(pool)]


@dataclass(frozen=True)
class Defects:
    """Which prompt positions get which defect (disjoint), and which rows are appended as duplicates."""

    contaminated: list[int]
    truncated: list[int]
    looped: list[int]
    duplicated: list[int]


def plan_defects(pool: list[Item], rng: random.Random) -> Defects:
    """Contamination on chain_sum prompts (the evaluation set's task), the rest anywhere, all disjoint."""
    sums = [i for i, item in enumerate(pool) if item.category == "chain_sum"]
    contaminated = rng.sample(sums, DEFECTS_PER_KIND)
    rest = rng.sample([i for i in range(len(pool)) if i not in contaminated], 3 * DEFECTS_PER_KIND)
    k = DEFECTS_PER_KIND
    return Defects(contaminated, rest[:k], rest[k : 2 * k], rest[2 * k :])


def corpus(style: str, pool: list[Item], evals: list[Item], defects: Defects) -> Corpus:
    """One teacher's rows: every prompt answered in ``style``, the defects applied, duplicates appended."""
    samples: list[Sample] = []
    for index, original in enumerate(pool):
        item = original
        if index in defects.contaminated:
            leaked = evals[defects.contaminated.index(index)]
            item = Item(leaked.prompt, leaked.steps, leaked.answer, original.category, original.difficulty)
        rng = random.Random(zlib.crc32(f"{style}:{index}".encode()))
        text = WRITERS[style](item, rng)
        if index in defects.truncated:
            text = text[: text.index("</think>") - max(1, len(text.split("</think>")[0]) // 3)]
        if index in defects.looped:
            text = text.replace("</think>", " ".join([LOOP] * LOOP_REPEATS) + "\n</think>")
        samples.append(sample(item, text, len(samples) + 1))
    for index in defects.duplicated:
        copy = samples[index]
        samples.append(sample(pool[index], copy.response, len(samples) + 1))
    return Corpus(style, f"study:{style}", samples)


def sample(item: Item, text: str, row: int) -> Sample:
    record = {
        "prompt": item.prompt,
        "response": text,
        "category": item.category,
        "difficulty": item.difficulty,
    }
    return make_sample(item.prompt, text, item.category, item.difficulty, row, record)


def injected_rows(defects: Defects, pool_size: int) -> dict[str, list[int]]:
    """The 1-based rows each filter should remove."""
    duplicates = list(range(pool_size + 1, pool_size + 1 + len(defects.duplicated)))
    return {
        "dedup": duplicates,
        "decontam": sorted(i + 1 for i in defects.contaminated),
        "ngram": sorted(i + 1 for i in defects.looped),
        "structure": sorted(i + 1 for i in defects.truncated),
    }


def filter_check(reports: list[CorpusReport], injected: dict[str, list[int]]) -> list[dict]:
    """Per teacher and filter: rows removed, defects injected, and whether the removed rows are those."""
    out = []
    for report in reports:
        for entry in report.filters:
            expected = injected[entry["filter"]]
            out.append(
                {
                    "teacher": report.label,
                    "filter": entry["filter"],
                    "removed": entry["removed"],
                    "injected": len(expected),
                    "exactly_the_injected": entry["removed"] == len(expected) and entry["rows"] == expected,
                }
            )
    return out


def check_table(rows: list[dict]) -> str:
    lines = [
        "| teacher | filter | rows removed | defects injected | exactly those rows |",
        "|---|---|---:|---:|---|",
    ]
    for row in rows:
        same = "yes" if row["exactly_the_injected"] else "no"
        cells = [row["teacher"], row["filter"], str(row["removed"]), str(row["injected"]), same]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_stats_study")
    parser.add_argument("--corpora", type=Path, help="also write each teacher's corpus as jsonl here")
    parser.add_argument("--no-perplexity", action="store_true", help="skip scoring (a quick look)")
    args = parser.parse_args()

    pool = with_difficulty(
        items("task:chain_sum", PROMPTS_PER_TASK, SEED, CHAIN_SUM_ARGS)
        + items("task:freeform", PROMPTS_PER_TASK, SEED, FREEFORM_ARGS)
    )
    evals = items("task:chain_sum", EVAL_SIZE, EVAL_SEED, CHAIN_SUM_ARGS)
    defects = plan_defects(pool, random.Random(SEED))
    corpora = [corpus(style, pool, evals, defects) for style in STYLES]

    tokenizer = load_tokenizer(MODEL)

    def encode(texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    filters = FilterSettings(FILTERS, eval_prompts=tuple(item.prompt for item in evals))
    ppl = None
    if not args.no_perplexity:
        renderer = context_renderer(tokenizer, "chat")
        score = model_scorer(load_model_for_eval(MODEL))
        ppl = PerplexitySettings(score, encode, renderer, "response", MAX_LEN, STRIDE, BATCH, PPL_SHARE)
    reports = [analyse(c, encode, BINS, filters, ppl, tokenizer.decode, progress=True) for c in corpora]

    settings = {
        "sources": [c.source for c in corpora],
        "labels": [c.label for c in corpora],
        "prompts": len(pool),
        "rows": len(corpora[0].samples),
        "tokenizer": MODEL,
        "perplexity": ppl is not None,
        "model": MODEL if ppl else None,
        "scope": "response",
        "context": "chat",
        "max_len": MAX_LEN,
        "stride": STRIDE,
        "batch_size": BATCH,
        "perplexity_share": PPL_SHARE,
        "bin_width": BINS.width,
        "cap": BINS.cap,
        "filters": list(FILTERS),
        "ngram_n": filters.ngram_n,
        "ngram_min_count": filters.ngram_min_count,
        "dedup_on": filters.dedup_on,
        "eval_sets": [f"task:chain_sum seed {EVAL_SEED}, {EVAL_SIZE} prompts"],
        "chain_sum_args": CHAIN_SUM_ARGS,
        "freeform_args": FREEFORM_ARGS,
        "seed": SEED,
    }
    stats_path, html_path = write_outputs(reports, settings, args.out)
    check = filter_check(reports, injected_rows(defects, len(pool)))
    table = markdown_table(comparison(reports))
    study = {"settings": settings, "comparison": comparison(reports), "filters": check}
    (args.out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    (args.out / "table.md").write_text(f"{table}\n\n{check_table(check)}\n")
    if args.corpora:
        for c in corpora:
            write_filtered(c.samples, args.corpora / f"{c.label}.jsonl")
        eval_rows = [make_sample(item.prompt, "", record={"prompt": item.prompt}) for item in evals]
        write_filtered(eval_rows, args.corpora / "eval.jsonl")
    print(table, "", check_table(check), sep="\n")
    print(f"wrote {stats_path}, {html_path}, {args.out / 'table.md'} and {args.out / 'study.json'}")


if __name__ == "__main__":
    main()
