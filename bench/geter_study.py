"""GETER's ablation: the trained graph embedding against a frozen random one and against no graph token, several
seeds, with the history facts in the prompt (the paper's setting) and without them (the graph token alone).

    OMP_NUM_THREADS=2 .venv/bin/python bench/geter_study.py                  # the bundled recipe, seeds 0 1 2
    .venv/bin/python bench/geter_study.py --seeds 0 --settings graph-only   # a smaller try
    .venv/bin/python bench/geter_study.py --resume                          # keep finished runs
    OMP_NUM_THREADS=1 .venv/bin/python bench/geter_study.py --smoke         # wiring check, tiny model

Every run is ``incentive geter`` on the bundled recipe with ``encoder.kind`` set to the arm, ``graph.seed`` and
``run.seed`` to the seed (a new graph and queries per seed; within a seed every arm answers the same queries).
Per run: label accuracy with its 95 % interval, accuracy per gold label, invalid answers, explanation ROUGE-L,
the encoder's link-prediction MRR. Per setting: the trained encoder against each baseline, paired over the same
queries (McNemar's exact test), per seed and pooled over seeds. Writes summary.json and table.md under --out
(--smoke: smoke_summary.json and smoke_table.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from progress import Progress

from incentive.geter.cli import DEFAULT_RECIPE
from incentive.geter.config import load_config
from incentive.geter.metrics import ablation_verdict
from incentive.geter.pipeline import run_geter

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("regcn", "random", "none")
SETTINGS = {"text": "graph.history_in_prompt=true", "graph-only": "graph.history_in_prompt=false"}
"""Study setting → the recipe override that makes it."""
BASELINES = {"random": "a frozen random embedding", "none": "no graph token"}
SMOKE = [
    "model.name=tiny-random",
    "model.lora=null",
    "optim.lr=5e-3",
    "graph.train_queries=120",
    "graph.eval_queries=30",
    "encoder.steps=60",
    "sft.steps=100",
    "eval.max_new_tokens=40",
    "eval.batch_size=30",
]
"""The --smoke overrides: the tiny random model (fully trained, a high learning rate) and few steps, to check
the study's wiring; its numbers say nothing about GETER."""


def run_one(work: Path, setting: str, seed: int, arm: str, extra: list[str], fresh: bool) -> dict[str, Any]:
    """One GETER run (unless ``fresh``, read back where an earlier invocation finished it); its eval summary,
    per-query correctness, and the encoder's MRR."""
    run_dir = work / setting / f"seed{seed}" / arm
    if fresh or not (run_dir / "eval.json").exists():
        sets = [SETTINGS[setting], f"encoder.kind={arm}", f"graph.seed={seed}", f"run.seed={seed}", *extra]
        run_geter(load_config(DEFAULT_RECIPE, sets), run_dir, overwrite=True)
    result = json.loads((run_dir / "eval.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mrr = next((r["mrr/eval"] for r in records if r["stage"] == "encoder_eval"), None)
    return {**result["summary"], "correct": [q["correct"] for q in result["queries"]], "mrr_eval": mrr}


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """Per setting and baseline: the trained encoder against it, per seed and pooled over all seeds' queries."""
    out: dict[str, Any] = {}
    for setting, seeds in results["runs"].items():
        for baseline, words in BASELINES.items():
            pairs = [
                (r["regcn"]["correct"], r[baseline]["correct"]) for r in seeds.values() if {"regcn", baseline} <= set(r)
            ]
            if not pairs:
                continue
            per_seed = [ablation_verdict(a, b, words)["diff"] for a, b in pairs]
            pooled = ablation_verdict([x for a, _ in pairs for x in a], [x for _, b in pairs for x in b], words)
            out[f"{setting}/{baseline}"] = {"seeds": len(pairs), "per_seed_diff": per_seed, **pooled}
    return out


def table(results: dict[str, Any]) -> str:
    lines = [
        "| setting | seed | arm | label accuracy [95% CI] | yes | no | unsure | invalid | ROUGE-L | encoder MRR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, seeds in results["runs"].items():
        for seed, arms in seeds.items():
            for arm, r in arms.items():
                low, high = r["label_accuracy_ci"]
                mrr = f"{r['mrr_eval']:.3f}" if r["mrr_eval"] is not None else ""
                per_label = " | ".join(f"{r.get(f'accuracy/{x}', 0):.0%}" for x in ("yes", "no", "unsure"))
                accuracy = f"{r['label_accuracy']:.1%} [{low:.1%}, {high:.1%}]"
                lines.append(
                    f"| {setting} | {seed} | {arm} | {accuracy} | {per_label} | {r['invalid_rate']:.0%} "
                    f"| {r['rouge_l']:.3f} | {mrr} |"
                )
    lines += [
        "",
        "| setting | trained vs | seeds | diff per seed | pooled diff [95% CI] | p (McNemar) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, v in results.get("verdicts", {}).items():
        setting, baseline = key.split("/")
        each = ", ".join(f"{d:+.1%}" for d in v["per_seed_diff"])
        lines.append(
            f"| {setting} | {baseline} | {v['seeds']} | {each} | {v['diff']:+.1%} [{v['ci'][0]:+.1%}, "
            f"{v['ci'][1]:+.1%}] | {v['p_value']:.3g} | {v['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument("--smoke", action="store_true", help="the tiny random model, a few steps (wiring check)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "geter_study")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "incentive" / "geter_study")
    parser.add_argument("--resume", action="store_true", help="keep the runs an earlier invocation finished")
    args = parser.parse_args()
    prefix = "smoke_" if args.smoke else ""
    work = args.work / ("smoke" if args.smoke else "full")
    extra = [*(SMOKE if args.smoke else []), *args.set]
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / f"{prefix}summary.json"
    results: dict[str, Any] = json.loads(summary_path.read_text()) if args.resume and summary_path.exists() else {}
    results.update(overrides=extra, runs=results.get("runs", {}))
    progress = Progress("geter-study", len(args.settings) * len(args.seeds) * len(args.arms))
    for setting in args.settings:
        for seed in args.seeds:
            arms = results["runs"].setdefault(setting, {}).setdefault(str(seed), {})
            for arm in args.arms:
                progress.start(f"{setting}, seed {seed}, {arm}")
                if not (args.resume and arm in arms):
                    arms[arm] = run_one(work, setting, seed, arm, extra, fresh=not args.resume)
                results["verdicts"] = verdicts(results)
                summary_path.write_text(json.dumps(results, indent=1))
                (args.out / f"{prefix}table.md").write_text(table(results))
    means = {
        f"{s}/{a}": statistics.mean(r[a]["label_accuracy"] for r in results["runs"][s].values() if a in r)
        for s in args.settings
        for a in args.arms
    }
    print(table(results))
    print("mean label accuracy over seeds: " + ", ".join(f"{k} {v:.1%}" for k, v in means.items()))


if __name__ == "__main__":
    main()
