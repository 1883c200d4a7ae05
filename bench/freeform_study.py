"""Free-form answers: more SFT vs GRPO (rule verifier, similarity, LLM judge) vs NOVER at equal wall-clock, several seeds.

    .venv/bin/python bench/freeform_study.py                         # every arm, seeds 0 1 2
    .venv/bin/python bench/freeform_study.py --seeds 0 --budget 120  # a smaller try
    .venv/bin/python bench/freeform_study.py --resume                # keep finished arms, run the rest

Per seed one SFT cold start (``recipes/freeform-sft.yaml``, 48 steps); every arm then trains from that checkpoint
(``recipes/freeform-<arm>.yaml``) for the same wall-clock budget: the steps each arm gets are fixed once, before
the first seed, from a short calibration of its seconds per step (rollout + reward + update; SFT: its step),
so every seed of an arm runs the same number of steps. All are scored greedily on the same held-out questions
by the accepted-wordings judge, which no arm trains on. Per arm and seed: accuracy with its 95 % interval and
the paired difference against the cold start (interval, exact McNemar p-value); across seeds the mean
difference and every (seed, question) pair pooled into one paired comparison. Writes summary.json and table.md
under --out (default bench/results/freeform_study).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from demo_sweep import changed_answers
from nover_study import ROOT, train
from progress import Progress

from incentive.evaluation import compare
from incentive.stats import agresti_min, sign_test

ARMS = ("sft", "grpo-rule", "grpo-similarity", "grpo-judge", "nover")
"""The arms, each ``recipes/freeform-<arm>.yaml``; ``sft`` continues SFT on examples the cold start did not see."""

COLD_START_STEPS = 48


def cold_start(work: Path, seed: int, eval_batch: int) -> Path:
    """The seed's SFT cold start (evaluated at its end only); returns its run folder."""
    run_dir = work / f"seed{seed}" / "cold-start"
    if not (run_dir / "evals.json").exists():
        train(
            "freeform-sft.yaml",
            run_dir,
            [
                f"sft.steps={COLD_START_STEPS}",
                f"run.seed={seed}",
                "eval.stages=[sft]",
                f"eval.batch_size={eval_batch}",
            ],
        )
    return run_dir


def arm_sets(arm: str, policy: Path, steps: int, seed: int, eval_batch: int) -> list[str]:
    """Overrides of one arm's run from the cold start's policy: ``steps`` of its own stage, then its eval."""
    sets = [f"model.name={policy}", f"run.seed={seed}", f"eval.batch_size={eval_batch}"]
    if arm == "sft":
        # other training questions than the cold start's (same split and knobs), evaluated at the end
        return [*sets, f"sft.steps={steps}", "rl.steps=0", f"data.seed={1000 + seed}", "eval.stages=[sft]"]
    return [*sets, "sft.steps=0", f"rl.steps={steps}", "eval.stages=[rl]"]


def records(run_dir: Path, stage: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        r
        for r in map(json.loads, lines)
        if r.get("stage") == stage and "step" in r and "eval/accuracy" not in r
    ]


def step_seconds(record: dict) -> float:
    """Wall-clock of one training step as the study budgets it (evaluation excluded)."""
    if "time/step_s" in record:
        return record["time/step_s"]
    return record["time/generate_s"] + record["time/reward_s"] + record["time/train_s"]


def calibrate(work: Path, policy: Path, eval_batch: int, steps: int = 3) -> dict[str, float]:
    """Seconds per step of each arm: the median over ``steps`` steps after the first (which warms caches up),
    robust to a step slowed by other work on the machine. A finished calibration run is read, not rerun."""
    per_step = {}
    for arm in ARMS:
        run_dir = work / "calibration" / arm
        stage = "sft" if arm == "sft" else "rl"
        if not (run_dir / "metrics.jsonl").exists() or len(records(run_dir, stage)) < steps + 1:
            sets = arm_sets(arm, policy, steps + 1, 0, eval_batch)
            train(f"freeform-{arm}.yaml", run_dir, [*sets, "eval.stages=[]"])
        per_step[arm] = statistics.median(step_seconds(r) for r in records(run_dir, stage)[1 : steps + 1])
        print(f"[study] calibration: {arm} {per_step[arm]:.1f} s/step", flush=True)
    return per_step


def arm_result(run_dir: Path, cold: Path, stage: str) -> dict:
    """Accuracy and the paired difference against the cold start's eval over the same questions."""
    evals = json.loads((run_dir / "evals.json").read_text())[stage]
    base = cold / json.loads((cold / "evals.json").read_text())["sft"]["completions_file"]
    mine = run_dir / evals["completions_file"]
    paired = compare(base, mine)
    train_records = records(run_dir, stage)
    return {
        "accuracy": evals["accuracy"],
        "accuracy_ci": evals["accuracy_ci"],
        "accuracy_lenient": evals["accuracy_lenient"],
        "format_rate": evals["format_rate"],
        "length_mean": evals["length_mean"],
        "paired": paired,
        "changed_answers": changed_answers(base, mine),
        "steps": len(train_records),
        "train_seconds": sum(step_seconds(r) for r in train_records),
        "by_domain": evals.get("by_domain"),
    }


def table(results: dict) -> str:
    lines = [
        "| seed | arm | accuracy [95% CI] | any format | − cold start [95% CI] | p (McNemar) | changed | steps | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, run in results["seeds"].items():
        cold = run["cold_start"]
        lines.append(
            f"| {seed} | cold start | {cold['accuracy']:.1%} [{cold['accuracy_ci'][0]:.1%}, "
            f"{cold['accuracy_ci'][1]:.1%}] | {cold['accuracy_lenient']:.1%} | | | | {COLD_START_STEPS} | |"
        )
        for arm, r in run["arms"].items():
            p = r["paired"]
            lines.append(
                f"| {seed} | {arm} | {r['accuracy']:.1%} [{r['accuracy_ci'][0]:.1%}, {r['accuracy_ci'][1]:.1%}] "
                f"| {r['accuracy_lenient']:.1%} | {p['diff']:+.1%} [{p['ci'][0]:+.1%}, {p['ci'][1]:+.1%}] "
                f"| {p['p_value']:.3g} | {r['changed_answers']:.0%} | {r['steps']} | {r['train_seconds']:.0f} |"
            )
    lines += [
        "",
        "| arm | seeds | mean − cold start | per seed | pooled pairs: − cold start [95% CI] | p (McNemar) |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        paired = [run["arms"][arm]["paired"] for run in results["seeds"].values() if arm in run["arms"]]
        if paired:
            each = ", ".join(f"{p['diff']:+.1%}" for p in paired)
            pooled = pool(paired)
            lines.append(
                f"| {arm} | {len(paired)} | {statistics.mean(p['diff'] for p in paired):+.1%} | {each} "
                f"| {pooled['diff']:+.1%} [{pooled['ci'][0]:+.1%}, {pooled['ci'][1]:+.1%}] "
                f"| {pooled['p_value']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def pool(paired: list[dict]) -> dict:
    """Every (seed, question) pair of an arm's seeds as one paired comparison with the cold starts: the
    difference, its Agresti–Min interval and McNemar's exact p over all pairs. Seeds share the questions, so
    the pairs are not fully independent and the interval is somewhat narrow; the per-seed rows show the spread."""
    n = sum(p["prompts"] for p in paired)
    a_only = sum(p["a_better"] for p in paired)
    b_only = sum(p["b_better"] for p in paired)
    return {
        "pairs": n,
        "diff": (b_only - a_only) / n,
        "ci": agresti_min(a_only, b_only, n),
        "p_value": sign_test(b_only, a_only),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--budget", type=float, default=300, help="training seconds per arm after the cold start"
    )
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "freeform_study")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "incentive" / "freeform_study")
    parser.add_argument("--resume", action="store_true", help="keep the arms an earlier invocation finished")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "summary.json"
    results: dict = json.loads(summary_path.read_text()) if args.resume and summary_path.exists() else {}
    results.setdefault("seeds", {})
    progress = Progress("study", len(args.seeds) * (1 + len(args.arms)) + 1)

    def save() -> None:
        summary_path.write_text(json.dumps(results, indent=2))
        (args.out / "table.md").write_text(table(results))

    for seed in args.seeds:
        run = results["seeds"].setdefault(str(seed), {"arms": {}})
        progress.start(f"seed {seed}: SFT cold start")
        cold = cold_start(args.work, seed, args.eval_batch)
        run["cold_start"] = {
            k: v for k, v in json.loads((cold / "evals.json").read_text())["sft"].items() if k != "per_domain"
        }
        policy = next((cold / "checkpoints").glob("sft-*")) / "policy"
        if "steps" not in results:
            progress.start("calibration: seconds per step of each arm")
            per_step = calibrate(args.work, policy, args.eval_batch)
            results.update(
                budget_s=args.budget,
                seconds_per_step=per_step,
                steps={arm: max(1, round(args.budget / s)) for arm, s in per_step.items()},
            )
            save()
        for arm in args.arms:
            progress.start(f"seed {seed}: {arm} ({results['steps'][arm]} steps)")
            if arm in run["arms"]:
                continue
            run_dir = args.work / f"seed{seed}" / arm
            sets = arm_sets(arm, policy, results["steps"][arm], seed, args.eval_batch)
            train(f"freeform-{arm}.yaml", run_dir, sets)
            run["arms"][arm] = arm_result(run_dir, cold, "sft" if arm == "sft" else "rl")
            save()
            print(table(results), flush=True)
    save()


if __name__ == "__main__":
    main()
