"""LASER-D study: plain GRPO vs LASER-D on chain_sum, the same SFT cold start and the same number of RL steps.

    .venv/bin/python bench/laser_study.py --steps 40 --out bench/results/laser_study

Both arms train from one SFT checkpoint with identical rollouts per step (2 prompts × 8 completions, up to 64
tokens), learning rate, loss and seed. GRPO's reward is LASER's correctness term alone (α = 0: correct 1, wrong
−0.5, no answer −1), so the arms differ only in LASER-D's length bonus with its monitored, difficulty-aware targets.
Held-out accuracy (rule verifier) and mean completion length are measured on the same problems, greedy, every
``--eval-every`` steps. Writes summary.json, table.md and curves.png under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nover_study import ROOT, common_settings, load, train
from progress import Progress


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="RL steps per arm")
    parser.add_argument("--lr", type=float, default=2e-6, help="RL learning rate of both arms")
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "laser_study")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    common = common_settings(args.eval_size)
    progress = Progress("study", 3)
    train("laser-d.yaml", out / "sft", common + ["rl.steps=0", "hooks=[]"], progress)
    sft_policy = next((out / "sft" / "checkpoints").glob("sft-*")) / "policy"
    rl = [
        f"model.name={sft_policy}",
        "sft.steps=0",
        f"rl.steps={args.steps}",
        f"eval.every={args.eval_every}",
        f"optim.lr={args.lr}",
    ]
    grpo_reward = "rewards=[{name: laser, args: {target_length: 64, alpha: 0.0}}]"
    train("laser-d.yaml", out / "grpo", common + rl + [grpo_reward, "hooks=[]"], progress)
    train("laser-d.yaml", out / "laser_d", common + rl, progress)
    report(out)


def curve(run_dir: Path, sft_eval: dict) -> list[tuple[int, float, float]]:
    """(step, accuracy, mean length) at SFT, at each in-training eval and at the end."""
    evals = json.loads((run_dir / "evals.json").read_text())
    points = [(0, sft_eval["accuracy"], sft_eval["length_mean"])]
    steps = sorted(int(k.removeprefix("rl-step")) for k in evals if k.startswith("rl-step"))
    points += [(s, evals[f"rl-step{s}"]["accuracy"], evals[f"rl-step{s}"]["length_mean"]) for s in steps]
    last = max(m["step"] for m in load(run_dir)[1] if m["stage"] == "rl")
    points.append((last, evals["rl"]["accuracy"], evals["rl"]["length_mean"]))
    return points


def report(out: Path) -> None:
    sft_evals, _ = load(out / "sft")
    rows = {"SFT": {**sft_evals["sft"], "seconds": 0.0, "monitor_seconds": 0.0}}
    curves = {}
    for arm, label in (("grpo", "SFT + GRPO"), ("laser_d", "SFT + LASER-D")):
        evals, metrics = load(out / arm)
        rl = [m for m in metrics if m["stage"] == "rl"]
        rows[label] = {
            **evals["rl"],
            "train_length_first10": sum(m["length/mean"] for m in rl[:10]) / len(rl[:10]),
            "train_length_last10": sum(m["length/mean"] for m in rl[-10:]) / len(rl[-10:]),
            "seconds": rl[-1]["time/rl_elapsed_s"],
            "monitor_seconds": sum(m.get("time/laser_monitor_s", 0.0) for m in rl),
            "steps": len(rl),
        }
        curves[arm] = {
            "eval": curve(out / arm, sft_evals["sft"]),
            "train_length": [(m["step"], m["length/mean"]) for m in rl],
            "reward": [(m["step"], m["reward/mean"]) for m in rl],
        }
        targets = [m for m in rl if any(k.startswith("laser/target") for k in m)]
        if targets:
            rows[label]["targets"] = {k: v for k, v in targets[-1].items() if k.startswith("laser/target")}
    (out / "summary.json").write_text(json.dumps({"rows": rows, "curves": curves}, indent=2, default=str))
    lines = [
        "| arm | held-out accuracy | mean length (eval, tokens) | train length, first → last 10 steps | RL s | monitoring s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        train_len = (
            f"{r['train_length_first10']:.1f} → {r['train_length_last10']:.1f}" if "steps" in r else "-"
        )
        lines.append(
            f"| {name} | {r['accuracy']:.1%} | {r['length_mean']:.1f} | {train_len} | {r['seconds']:.0f} | {r['monitor_seconds']:.0f} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, curves)


def plot(out: Path, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for arm, c in curves.items():
        label = {"grpo": "GRPO", "laser_d": "LASER-D"}[arm]
        steps, acc, length = zip(*c["eval"], strict=True)
        axes[0].plot(steps, acc, marker="o", label=label)
        axes[1].plot(steps, length, marker="o", label=label)
        xs, ys = zip(*c["train_length"], strict=True)
        axes[2].plot(xs, ys, label=label)
    titles = ("held-out accuracy (greedy)", "held-out mean length (tokens)", "training completion length")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("RL step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


if __name__ == "__main__":
    main()
