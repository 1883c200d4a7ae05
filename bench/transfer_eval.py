"""Transfer: the free-form study's checkpoints scored on reasoning-gym families none of them trained on.

    .venv/bin/python bench/transfer_eval.py                  # seed 0's cold start and every arm
    .venv/bin/python bench/transfer_eval.py --seeds 0 1 2 --size 256

Families: ``calendar_arithmetic`` (near: weekdays and dates, like the weekday questions), ``letter_counting``
(near: counting), ``chain_sum`` (far: arithmetic with a numeric answer). Each checkpoint is scored greedily by the
rule verifier on the same ``--size`` problems of each family; every arm is paired with its seed's cold start over
the same problems (difference, interval, exact McNemar p-value), and over seeds every (seed, problem) pair pooled.
Reads the checkpoints bench/freeform_study.py left under --work; writes summary.json and table.md under --out
(default bench/results/transfer_eval), keeping the seeds an earlier invocation scored and this one does not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from freeform_study import ARMS, pool
from nover_study import ROOT
from progress import Progress

from incentive.evaluation import compare

FAMILIES = {
    "calendar_arithmetic": "near",
    "letter_counting": "near",
    "chain_sum": "far",
}
"""Family → how close it is to the free-form task (weekday, clock, compare and count questions)."""


def policy(run_dir: Path) -> Path:
    """The policy of a run's last checkpoint."""
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / "policy"


def evaluate(model: Path, family: str, size: int, max_new_tokens: int, out: Path) -> dict:
    """``incentive eval`` of one checkpoint on one family (kept when done already)."""
    if not (out / "eval.json").exists():
        cmd = [
            sys.executable, "-m", "incentive.cli", "eval", "--model", str(model), "--data", f"task:{family}",
            "--size", str(size), "--seed", "4242", "--max-new-tokens", str(max_new_tokens), "--batch-size", "128",
            "--verifier", "rule", "--out", str(out),
        ]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "eval.json").read_text())


def table(results: dict) -> str:
    lines = [
        "| seed | family | checkpoint | accuracy [95% CI] | − cold start [95% CI] | p (McNemar) |",
        "|---|---|---|---|---|---|",
    ]
    for seed, families in results.items():
        for family, rows in families.items():
            for name, r in rows.items():
                paired = r.get("paired")
                diff = (
                    f"{paired['diff']:+.1%} [{paired['ci'][0]:+.1%}, {paired['ci'][1]:+.1%}] | {paired['p_value']:.3g}"
                    if paired
                    else " | "
                )
                lines.append(
                    f"| {seed} | {family} ({FAMILIES[family]}) | {name} | {r['accuracy']:.1%} "
                    f"[{r['accuracy_ci'][0]:.1%}, {r['accuracy_ci'][1]:.1%}] | {diff} |"
                )
    lines += ["", "| family | checkpoint | seeds | pooled pairs: − cold start [95% CI] | p (McNemar) |"]
    lines.append("|---|---|---|---|---|")
    for family in FAMILIES:
        for name in ARMS:
            paired = [
                rows[family][name]["paired"]
                for rows in results.values()
                if "paired" in rows.get(family, {}).get(name, {})
            ]
            if paired:
                pooled = pool(paired)
                lines.append(
                    f"| {family} | {name} | {len(paired)} | {pooled['diff']:+.1%} "
                    f"[{pooled['ci'][0]:+.1%}, {pooled['ci'][1]:+.1%}] | {pooled['p_value']:.3g} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "incentive" / "freeform_study")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "transfer_eval")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = ["cold-start", *ARMS]
    progress = Progress("transfer", len(args.seeds) * len(args.families) * len(names))
    summary = args.out / "summary.json"
    results: dict = json.loads(summary.read_text()) if summary.exists() else {}
    for seed in args.seeds:
        results[str(seed)] = {}
        for family in args.families:
            rows = results[str(seed)].setdefault(family, {})
            for name in names:
                run_dir = args.work / f"seed{seed}" / name
                progress.start(f"seed {seed}, {family}: {name}")
                if not (run_dir / "checkpoints" / "latest").exists():
                    print(f"[transfer] {run_dir} has no checkpoint yet; left out", flush=True)
                    continue
                out = args.work / "transfer" / f"seed{seed}" / family / name
                result = evaluate(policy(run_dir), family, args.size, args.max_new_tokens, out)
                row = {k: result[k] for k in ("accuracy", "accuracy_ci", "accuracy_lenient", "format_rate", "n")}
                if name != "cold-start" and "cold-start" in rows:
                    base = args.work / "transfer" / f"seed{seed}" / family / "cold-start"
                    row["paired"] = compare(base / "eval.completions.jsonl", out / "eval.completions.jsonl")
                rows[name] = row
                summary.write_text(json.dumps(results, indent=2))
                (args.out / "table.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
