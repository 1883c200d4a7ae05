"""NOVER's proxy scoring: prefix sharing against whole rows, on the embedded model, same process, alternating.

    .venv/bin/python bench/nover_scoring.py                 # 4 prompts x 4 completions, 7 repetitions
    .venv/bin/python bench/nover_scoring.py --prompts 8 --reps 5

Workload: reasoning-gym chain_sum prompts (as `make demo`) rendered with the think-answer template, G written
reasonings per prompt ("12 + 7 = 19"-style, 2-6 terms, seeded), scored as NOVER scores them: context = prompt +
reasoning block, target = the answer block with the reference. "whole rows" is one left-padded forward over
every row's prompt + reasoning + reference, the head on the reference only — what the scorer did before, and what
a scorer without prefix sharing does; "shared prefix" is :func:`incentive.logprobs.target_logprobs` now (each
prompt once, every row's reasoning + reference packed after it). Writes bench/results/nover_scoring.{json,md}
with the median times, their ratio and the largest logprob difference between the two.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from incentive.config import TemplateConfig
from incentive.data import DataConfig, load_examples
from incentive.logprobs import forward_target_logprobs, plan_batches, shared_prefixes, target_logprobs
from incentive.models import load_model, load_tokenizer
from incentive.run import build_template

OUT = Path(__file__).resolve().parent / "results" / "nover_scoring"


def workload(prompts: int, generations: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """NOVER's scoring inputs: (prompt + reasoning block) contexts and (answer block) targets."""
    tokenizer = load_tokenizer("embedded")
    task = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
    examples = load_examples(
        DataConfig(source="task:chain_sum", size=prompts, seed=seed, task_args=task)
    ).examples
    template = build_template(TemplateConfig())
    rng = random.Random(seed)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    contexts, targets = [], []
    for example in examples:
        prompt = ids(template.render(example, tokenizer))
        for _ in range(generations):
            terms = [rng.randint(1, 99) for _ in range(rng.randint(2, 6))]
            reasoning = f"{' + '.join(map(str, terms))} = {sum(terms)}"
            contexts.append(prompt + ids(f"<think>{reasoning}</think>"))
            targets.append(ids(f"<answer>{example.reference}</answer>"))
    return contexts, targets


def whole_rows(
    model: torch.nn.Module, contexts: list[list[int]], targets: list[list[int]]
) -> list[torch.Tensor]:
    """Every row's prompt + reasoning + reference in one left-padded forward per micro-batch."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(contexts)
    for batch in plan_batches(contexts, targets, 4096):
        for i, logp in zip(batch, forward_target_logprobs(model, contexts, targets, batch), strict=True):
            out[i] = logp
    return out


def timed(fn: Callable[[], list[torch.Tensor]]) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("embedded").eval()
    contexts, targets = workload(args.prompts, args.generations)
    prefixes = shared_prefixes(contexts)
    times: dict[str, list[float]] = {"whole_rows": [], "shared_prefix": []}
    with torch.no_grad():
        whole_rows(model, contexts, targets)  # warm-up
        target_logprobs(model, contexts, targets)
        for rep in range(args.reps):
            seconds, whole = timed(lambda: whole_rows(model, contexts, targets))
            times["whole_rows"].append(seconds)
            seconds, shared = timed(lambda: target_logprobs(model, contexts, targets))
            times["shared_prefix"].append(seconds)
            print(
                f"[nover_scoring] rep {rep + 1}/{args.reps}: whole rows {times['whole_rows'][-1]:.3f} s, "
                f"shared prefix {seconds:.3f} s",
                flush=True,
            )
    medians = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "workload": {
            "rows": len(contexts),
            "prompt_tokens": sorted(set(prefixes)),
            "context_tokens": [min(map(len, contexts)), max(map(len, contexts))],
            "target_tokens": [min(map(len, targets)), max(map(len, targets))],
        },
        "seconds": times,
        "median_s": medians,
        "speedup": medians["whole_rows"] / medians["shared_prefix"],
        "max_abs_logprob_difference": max(
            (a - b).abs().max().item() for a, b in zip(whole, shared, strict=True)
        ),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    OUT.with_suffix(".md").write_text(
        "| scoring | median s |\n|---|---|\n"
        f"| whole rows | {medians['whole_rows']:.3f} |\n| shared prefix | {medians['shared_prefix']:.3f} |\n\n"
        f"{len(contexts)} rows; speedup {results['speedup']:.2f}x; largest logprob difference "
        f"{results['max_abs_logprob_difference']:.1e}\n"
    )
    print(
        f"[nover_scoring] whole rows {medians['whole_rows']:.3f} s, shared prefix {medians['shared_prefix']:.3f} s "
        f"({results['speedup']:.2f}x); results in {OUT.with_suffix('.json')}"
    )


if __name__ == "__main__":
    main()
