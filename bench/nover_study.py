"""NOVER study: base vs SFT vs GRPO (rule verifier) vs NOVER (no verifier) on chain_sum, equal RL time budgets.

    .venv/bin/python bench/nover_study.py --budget 480 --out bench/results/nover_study

Both RL arms start from the same SFT cold start and get the same wall-clock budget of rollout + reward + update
time (evaluation excluded). Held-out accuracy is judged by the rule verifier on the same problems for every arm.
Writes summary.json, curves.png and a markdown table under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from progress import Progress

ROOT = Path(__file__).resolve().parents[1]
TASK = "{min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2}"


def train(recipe: str, run_dir: Path, sets: list[str]) -> None:
    """``incentive train`` of a bundled recipe into ``run_dir`` (overwritten) with ``--set`` overrides."""
    cmd = [
        sys.executable,
        "-m",
        "incentive.cli",
        "train",
        str(ROOT / "recipes" / recipe),
        "--run-dir",
        str(run_dir),
    ]
    cmd += ["--overwrite"] + [x for s in sets for x in ("--set", s)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def common_settings(eval_size: int) -> list[str]:
    """--set overrides every arm of a chain_sum study shares: the task, the held-out set (greedy), the seed."""
    return [
        f"eval.data={{source: 'task:chain_sum', size: {eval_size}, seed: 12345, task_args: {TASK}}}",
        "eval.max_new_tokens=64",
        f"data.task_args={TASK}",
        "run.seed=0",
    ]


def load(run_dir: Path) -> tuple[dict, list[dict]]:
    evals = json.loads((run_dir / "evals.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return evals, metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=480, help="RL seconds per arm")
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "nover_study")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    common = common_settings(args.eval_size)
    progress = Progress("study", 3)
    progress.start("arm 'sft' (demo.yaml)")
    train("demo.yaml", out / "sft", common + ["rl.steps=0"])
    sft_policy = next((out / "sft" / "checkpoints").glob("sft-*")) / "policy"
    rl = [
        f"model.name={sft_policy}",
        "sft.steps=0",
        "rl.steps=1000",
        f"rl.time_budget_s={args.budget}",
        f"eval.every={args.eval_every}",
    ]
    progress.start("arm 'grpo' (grpo-chain-sum.yaml)")
    train("grpo-chain-sum.yaml", out / "grpo", common + rl + ["generation.temperature=0.7"])
    progress.start("arm 'nover' (nover-chain-sum.yaml)")
    train("nover-chain-sum.yaml", out / "nover", common + rl)
    report(out, args.budget)


def report(out: Path, budget: float) -> None:
    sft_evals, _ = load(out / "sft")
    rows = {"base": sft_evals["base"], "SFT": sft_evals["sft"]}
    curves = {}
    for arm in ("grpo", "nover"):
        evals, metrics = load(out / arm)
        rows[f"SFT + {arm.upper()}"] = evals["rl"]
        rl = [m for m in metrics if m["stage"] == "rl"]
        rows[f"SFT + {arm.upper()}"]["rl_steps"] = len(rl)
        points = [(0.0, sft_evals["sft"]["accuracy"])]
        points += [(m["time/rl_elapsed_s"], m["eval/accuracy"]) for m in rl if "eval/accuracy" in m]
        points.append((rl[-1]["time/rl_elapsed_s"], evals["rl"]["accuracy"]))
        curves[arm] = {
            "accuracy": points,
            "reward": [(m["time/rl_elapsed_s"], m["reward/mean"]) for m in rl],
            "length": [(m["time/rl_elapsed_s"], m["length/mean"]) for m in rl],
        }
    (out / "summary.json").write_text(
        json.dumps({"budget_s": budget, "rows": rows, "curves": curves}, indent=2)
    )
    lines = [
        "| arm | accuracy | format rate | mean length (tokens) | RL steps in budget |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['accuracy']:.1%} | {r['format_rate']:.1%} | {r['length_mean']:.1f} | "
            f"{r.get('rl_steps', '-')} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for arm, c in curves.items():
        for ax, key in zip(axes, ("accuracy", "reward", "length"), strict=True):
            xs, ys = zip(*c[key], strict=True)
            ax.plot(xs, ys, marker="o" if key == "accuracy" else None, label=arm.upper())
            ax.set_title(
                {
                    "accuracy": "held-out accuracy (verifier)",
                    "reward": "training reward (own scale)",
                    "length": "completion length",
                }[key]
            )
            ax.set_xlabel("RL seconds")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


if __name__ == "__main__":
    main()
