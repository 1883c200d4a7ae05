"""Which RL settings make the demo's RL stage beat its SFT stage beyond noise, measured rather than guessed.

    .venv/bin/python bench/demo_sweep.py                              # every arm, seed 0
    .venv/bin/python bench/demo_sweep.py --arms nover-lr1e-5 grpo-lr1e-5 --seeds 0 1
    .venv/bin/python bench/demo_sweep.py --resume                     # keep finished arms, run the rest

One SFT cold start per seed (``recipes/demo.yaml`` with ``rl.steps=0``); every arm then runs RL from that
checkpoint with its own overrides and is scored greedily by the rule verifier (which no NOVER arm trains on) on
the same held-out chain_sum prompts as the SFT checkpoint. Per arm: accuracy with its 95 % interval, the paired
difference RL − SFT over the same prompts (the arm's own comparison.json: interval and exact McNemar p-value), the share of prompts whose greedy
answer changed, RL seconds (rollout + reward + update; evals not counted) and seconds per step. Writes
summary.json and table.md under --out (default bench/results/demo_sweep).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nover_study import ROOT, train
from progress import Progress

from incentive.evaluation import read_completions


def nover(lr: str, groups: int, temperature: float, kl_beta: float) -> tuple[str, list[str]]:
    """A NOVER arm on ``recipes/nover-chain-sum.yaml``'s rewards and proxy, with every setting the sweep varies spelled out (so an
    arm means the same whatever the demo recipe says today)."""
    return (
        "nover-chain-sum.yaml",
        [
            f"optim.lr={lr}",
            f"generation.prompts_per_step={groups}",
            f"generation.num_generations={groups}",
            f"generation.temperature={temperature}",
            f"loss.kl_beta={kl_beta}",
            "loss.kl_estimator=k3",
            "loss.kl_reference=proxy",
        ],
    )


ARMS: dict[str, tuple[str, list[str]]] = {
    "nover-demo": nover("2e-6", 4, 0.7, 0.1),
    "nover-lr1e-5": nover("1e-5", 8, 0.7, 0.1),
    "nover-lr1e-5-nokl": nover("1e-5", 8, 0.7, 0.0),
    "nover-lr2e-5-nokl": nover("2e-5", 8, 0.7, 0.0),
    "nover-lr2e-5-nokl-t1": nover("2e-5", 8, 1.0, 0.0),
    "grpo-lr1e-5": (
        "grpo-chain-sum.yaml",
        [
            "optim.lr=1e-5",
            "generation.prompts_per_step=8",
            "generation.num_generations=8",
            "generation.temperature=1.0",
        ],
    ),
}
"""Arm name → (recipe, overrides on top of the shared settings). Each arm runs --steps RL steps. The demo recipe's
RL settings are ``nover-lr2e-5-nokl-t1``'s; ``nover-demo`` is the demo before this sweep."""


def shared(eval_size: int, seed: int) -> list[str]:
    """Overrides every run of a seed shares: the demo's held-out set made larger, greedy, and the seed."""
    return [
        f"eval.data.size={eval_size}",
        "eval.max_new_tokens=64",
        "eval.data.source=task:chain_sum",
        "data.task_args={min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2}",
        f"run.seed={seed}",
    ]


def changed_answers(a: Path, b: Path) -> float:
    """Share of prompts whose (first) greedy answer differs between two evals of the same prompts."""
    rows_a, rows_b = read_completions(a), read_completions(b)
    answers_a = {r["id"]: r["completions"][0]["answer"] for r in rows_a}
    differ = sum(answers_a[r["id"]] != r["completions"][0]["answer"] for r in rows_b)
    return differ / len(rows_b)


def arm_result(run_dir: Path) -> dict:
    """Accuracy, interval, paired difference against the SFT checkpoint (the arm's base eval) and time of one
    finished arm."""
    evals = json.loads((run_dir / "evals.json").read_text())
    rl = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in rl if m.get("stage") == "rl" and "time/train_s" in m]
    paired = json.loads((run_dir / "comparison.json").read_text())
    seconds = sum(m["time/generate_s"] + m["time/reward_s"] + m["time/train_s"] for m in rl)
    return {
        "accuracy": evals["rl"]["accuracy"],
        "accuracy_ci": evals["rl"]["accuracy_ci"],
        "sft_accuracy": evals["base"]["accuracy"],
        "paired": paired,
        "changed_answers": changed_answers(run_dir / "evals" / "base.completions.jsonl", Path(paired["b"])),
        "rl_seconds": seconds,
        "steps": len(rl),
        "seconds_per_step": seconds / max(len(rl), 1),
        "time_split_s": {k: sum(m[f"time/{k}_s"] for m in rl) for k in ("generate", "reward", "train")},
        "reward_first_last": [rl[0]["reward/mean"], rl[-1]["reward/mean"]] if rl else None,
    }


def table(results: dict) -> str:
    lines = [
        "| seed | arm | accuracy [95% CI] | RL − SFT [95% CI] | p (McNemar) | changed answers | steps | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, run in results.items():
        sft = run["sft"]
        lines.append(
            f"| {seed} | SFT | {sft['accuracy']:.1%} [{sft['accuracy_ci'][0]:.1%}, {sft['accuracy_ci'][1]:.1%}] "
            "| | | | | |"
        )
        for arm, r in run["arms"].items():
            p = r["paired"]
            lines.append(
                f"| {seed} | {arm} | {r['accuracy']:.1%} [{r['accuracy_ci'][0]:.1%}, {r['accuracy_ci'][1]:.1%}] "
                f"| {p['diff']:+.1%} [{p['ci'][0]:+.1%}, {p['ci'][1]:+.1%}] "
                f"| {p['p_value']:.3g} | {r['changed_answers']:.0%} | {r['steps']} | {r['seconds_per_step']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=24, help="RL steps per arm")
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_sweep")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "incentive" / "demo_sweep")
    parser.add_argument("--resume", action="store_true", help="keep the arms an earlier invocation finished")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "summary.json"
    results: dict = json.loads(summary_path.read_text()) if args.resume and summary_path.exists() else {}
    progress = Progress("sweep", len(args.seeds) * (1 + len(args.arms)))
    for seed in args.seeds:
        run = results.setdefault(str(seed), {"arms": {}})
        common = shared(args.eval_size, seed)
        sft_dir = args.work / f"seed{seed}" / "sft"
        progress.start(f"seed {seed}: SFT cold start")
        if "sft" not in run or not (sft_dir / "evals.json").exists():
            train("demo.yaml", sft_dir, [*common, "rl.steps=0"])
            run["sft"] = json.loads((sft_dir / "evals.json").read_text())["sft"]
        sft_policy = next((sft_dir / "checkpoints").glob("sft-*")) / "policy"
        for arm in args.arms:
            progress.start(f"seed {seed}: {arm}")
            if arm in run["arms"]:
                continue
            recipe, sets = ARMS[arm]
            run_dir = args.work / f"seed{seed}" / arm
            train(
                recipe,
                run_dir,
                [*common, f"model.name={sft_policy}", "sft.steps=0", f"rl.steps={args.steps}", *sets],
            )
            run["arms"][arm] = arm_result(run_dir)
            summary_path.write_text(json.dumps(results, indent=2))
            (args.out / "table.md").write_text(table(results))
            print(table(results), flush=True)
    summary_path.write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text(table(results))


if __name__ == "__main__":
    main()
