"""HCRMP study: the hinted controller without hints, with oracle hints and with noisy hints (wrong at rate ρ),
at the same training budget over a few seeds, each scored on the same evaluation episodes.

    .venv/bin/python bench/hcrmp_study.py                                  # 3 arms × seeds 0 1 2, 16384 steps
    .venv/bin/python bench/hcrmp_study.py --rates 0.2 0.42 0.6             # a sweep over ρ
    .venv/bin/python bench/hcrmp_study.py --seeds 0 --steps 512 --eval-episodes 3 --out /tmp/hcrmp-smoke
    .venv/bin/python bench/hcrmp_study.py --set env.name=stub              # any recipe override, every arm
    .venv/bin/python bench/hcrmp_study.py --arms oracle --seeds 1          # one run; --resume later collects all

Every arm runs ``recipes/control/hcrmp.yaml`` with ``hints.source`` set (none, oracle, noisy + hints.noise_rate)
and ``run.seed`` per seed; everything else is shared. Writes each run folder under --out/<arm>/seed<N>/ and,
at --out, summary.json and table.md: per arm the mean over seeds (and each seed) of success rate, collision
rate, off-road rate, mean speed, hint-call rate and cache-hit rate. ``--resume`` keeps finished runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from progress import Progress

from incentive.control.config import load_control_recipe
from incentive.control.runner import train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "control" / "hcrmp.yaml"
METRICS = ("success_rate", "collision_rate", "offroad_rate", "mean_speed", "hint_call_rate", "cache_hit_rate")


def arms(rates: list[float]) -> dict[str, list[str]]:
    """Each arm's overrides: no hints, oracle hints, and one noisy arm per rate."""
    out = {"none": ["hints.source=none"], "oracle": ["hints.source=oracle"]}
    for rate in rates:
        out[f"noisy-{rate:g}"] = ["hints.source=noisy", f"hints.noise_rate={rate}"]
    return out


def run_one(run_dir: Path, sets: list[str], resume: bool) -> dict:
    """One arm and seed: its evaluation (read back when ``resume`` finds it finished)."""
    done = run_dir / "eval.json"
    if resume and done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = load_control_recipe(RECIPE, sets)
    return train(recipe, run_dir, log=lambda line: print(f"  {line}", flush=True))


def table(summary: dict) -> str:
    s = summary["settings"]
    lines = [
        f"HCRMP study: {s['steps']} training steps, evaluation on {s['eval_episodes']} shared episodes, "
        f"seeds {', '.join(map(str, s['seeds']))}; overrides: {' '.join(s['sets']) or 'none'}",
        "",
        "| arm | success | collisions | off road | mean speed (m/s) | hint calls | cache hits | success per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in summary["arms"].items():
        mean = r["mean"]
        per_seed = ", ".join(f"{x['success_rate']:.0%}" for x in r["seeds"].values())
        lines.append(
            f"| {arm} | {mean['success_rate']:.1%} | {mean['collision_rate']:.1%} | {mean['offroad_rate']:.1%} | "
            f"{mean['mean_speed']:.1f} | "
            f"{mean['hint_call_rate']:.1%} | {mean['cache_hit_rate']:.1%} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=16384, help="training steps per run (ppo.total_steps)")
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.42], help="noise rates ρ of the noisy arms")
    parser.add_argument("--arms", nargs="+", help="run only these arms (none, oracle, noisy-<ρ>); default: all")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, all arms")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hcrmp_study")
    parser.add_argument("--resume", action="store_true", help="keep runs that finished")
    args = parser.parse_args()
    plan = arms(args.rates)
    unknown = sorted(set(args.arms or []) - set(plan))
    if unknown:
        parser.error(f"--arms {' '.join(unknown)}: not an arm of this study ({', '.join(plan)})")
    plan = {name: sets for name, sets in plan.items() if not args.arms or name in args.arms}
    shared = [f"ppo.total_steps={args.steps}", f"eval.episodes={args.eval_episodes}", *args.set]
    progress = Progress("hcrmp", len(plan) * len(args.seeds))
    results: dict[str, dict] = {}
    for arm, sets in plan.items():
        results[arm] = {"seeds": {}}
        for seed in args.seeds:
            progress.start(f"{arm}, seed {seed}")
            run_dir = args.out / arm / f"seed{seed}"
            result = run_one(run_dir, [*shared, *sets, f"run.seed={seed}"], args.resume)
            results[arm]["seeds"][str(seed)] = {k: result.get(k, 0.0) for k in METRICS}
        per_seed = results[arm]["seeds"].values()
        results[arm]["mean"] = {k: statistics.mean(x[k] for x in per_seed) for k in METRICS}
    summary = {
        "settings": {"steps": args.steps, "eval_episodes": args.eval_episodes, "seeds": args.seeds, "sets": args.set},
        "command": " ".join(["python", *sys.argv]),
        "arms": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "table.md").write_text(table(summary))
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
