"""False-negative and false-positive rates of each verifier on the hand-made equivalence set.

    .venv/bin/python bench/equivalence_report.py

Each row of src/incentive/data/equivalence.jsonl holds a reference, a correct answer written differently, and a
wrong answer. A verifier's false-negative rate is the share of correct answers it rejects, its false-positive rate
the share of wrong answers it accepts. The LLM-judge verifiers use the --judge model (default: the embedded
SmolLM2-135M-Instruct, far weaker than the 1.5B judges of the papers). Writes report.json, report.md and each
judge's raw decisions (*-decisions.jsonl) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from progress import Progress

from incentive.data import Example
from incentive.models import load_tokenizer
from incentive.rewards import REWARDS, Reward, RewardContext
from incentive.rollout.types import Completion, RolloutBatch
from incentive.templates import TagFormat

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "incentive" / "data" / "equivalence.jsonl"


def load_rows(path: Path = DATA) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_batch(rows: list[dict[str, Any]], tokenizer: Any) -> RolloutBatch:
    """Two completions per row, the correct answer then the wrong one, each in answer tags."""
    completions = []
    for i, row in enumerate(rows):
        meta = {k: row[k] for k in ("choices", "answer_type") if k in row}
        example = Example(row["question"], row["reference"], row["id"], row["category"], None, meta)
        prompt_ids = tokenizer.encode(row["question"], add_special_tokens=False)
        for answer in (row["equivalent"], row["wrong"]):
            text = f"<think>\n...\n</think>\n<answer>\n{answer}\n</answer>"
            ids = tokenizer.encode(text, add_special_tokens=False)
            completions.append(Completion(i, example, row["question"], prompt_ids, ids, text))
    return RolloutBatch(completions)


def verifiers(judge: str, gr_tokens: int, out: Path) -> dict[str, Reward]:
    """The rule verifier, TinyV as a fallback and on its own, and General-Reasoner; judges log their raw outputs."""
    logs = {name: out / f"{name}-decisions.jsonl" for name in ("tinyv", "tinyv_only", "general_reasoner")}
    for log in logs.values():
        log.unlink(missing_ok=True)
    return {
        "rule": REWARDS.get("verifier")(),
        "tinyv (addon)": REWARDS.get("tinyv")(model=judge, log_file=str(logs["tinyv"])),
        "tinyv judge alone": REWARDS.get("tinyv")(
            model=judge, mode="tinyv_only", log_file=str(logs["tinyv_only"])
        ),
        "general_reasoner": REWARDS.get("general_reasoner")(
            model=judge, max_new_tokens=gr_tokens, log_file=str(logs["general_reasoner"])
        ),
    }


def rates(rows: list[dict[str, Any]], correct: list[bool]) -> dict[str, Any]:
    """FN = correct answer rejected, FP = wrong answer accepted; overall and per category."""
    by_category: dict[str, dict[str, list[bool]]] = {}
    for i, row in enumerate(rows):
        cell = by_category.setdefault(row["category"], {"fn": [], "fp": []})
        cell["fn"].append(not correct[2 * i])
        cell["fp"].append(correct[2 * i + 1])
    fn = [x for c in by_category.values() for x in c["fn"]]
    fp = [x for c in by_category.values() for x in c["fp"]]
    return {
        "false_negative_rate": sum(fn) / len(fn),
        "false_positive_rate": sum(fp) / len(fp),
        "by_category": {
            name: {"rows": len(c["fn"]), "fn": sum(c["fn"]), "fp": sum(c["fp"])}
            for name, c in sorted(by_category.items())
        },
        "missed": [rows[i]["id"] for i in range(len(rows)) if not correct[2 * i]],
        "accepted_wrong": [rows[i]["id"] for i in range(len(rows)) if correct[2 * i + 1]],
    }


def markdown(report: dict[str, Any]) -> str:
    results = report["verifiers"]
    lines = [
        "# Verifier equivalence report",
        "",
        f"{report['rows']} rows (reference, correct-but-differently-written answer, wrong answer) from "
        f"`{report['data']}`; judge model `{report['judge']}`; general_reasoner judge output capped at "
        f"{report['gr_max_new_tokens']} tokens. Reproduce: `{report['command']}`.",
        "",
        "| verifier | false-negative rate | false-positive rate | judge outputs (unreadable) | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        counts = r.get("judge_counts")
        judged = f"{counts.get('generated', 0)} ({counts.get('unreadable', 0)})" if counts else "-"
        lines.append(
            f"| {name} | {r['false_negative_rate']:.1%} | {r['false_positive_rate']:.1%} | {judged} | "
            f"{r['seconds']:.1f} |"
        )
    categories = next(iter(results.values()))["by_category"]
    lines += ["", "Misses (FN) / wrong answers accepted (FP) per category:", ""]
    lines += ["| category | rows | " + " | ".join(results) + " |", "|---" * (len(results) + 2) + "|"]
    for cat, cell in categories.items():
        cells = [f"{r['by_category'][cat]['fn']} / {r['by_category'][cat]['fp']}" for r in results.values()]
        lines.append(f"| {cat} | {cell['rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--judge", default="embedded", help="judge model for tinyv and general_reasoner")
    parser.add_argument(
        "--gr-max-new-tokens", type=int, default=128, help="general_reasoner judge output cap"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "equivalence")
    args = parser.parse_args()
    rows = load_rows()
    tokenizer = load_tokenizer(args.judge)
    batch = build_batch(rows, tokenizer)
    ctx = RewardContext(tokenizer, TagFormat())
    results: dict[str, Any] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = verifiers(args.judge, args.gr_max_new_tokens, args.out)
    progress = Progress("equivalence", len(chosen))
    for name, verifier in chosen.items():
        progress.start(f"verifier '{name}' on {len(batch)} answers")
        start = time.perf_counter()
        result = verifier(batch, ctx)
        correct = [bool(c) for c in result.extras.get("correct", [s >= 1 for s in result.scores])]
        results[name] = {**rates(rows, correct), "seconds": time.perf_counter() - start}
        judge = getattr(verifier, "judge", None)
        if judge is not None:  # generated / unreadable / failed / cache_hits
            results[name]["judge_counts"] = dict(judge.counts)
        print(
            f"{name:>18}: FN {results[name]['false_negative_rate']:.1%}  "
            f"FP {results[name]['false_positive_rate']:.1%}  ({results[name]['seconds']:.1f} s)",
            flush=True,
        )
    report = {
        "data": str(DATA.relative_to(ROOT)),
        "rows": len(rows),
        "judge": args.judge,
        "gr_max_new_tokens": args.gr_max_new_tokens,
        "command": ".venv/bin/python bench/equivalence_report.py",
        "verifiers": results,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
