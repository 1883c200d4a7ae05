"""``incentive control RECIPE``: validate the recipe, refuse a missing simulator before anything loads, then train
and evaluate the hinted controller in a run folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from incentive.paths import empty_run_dir, recipe_path

DESCRIPTION = """LLM-hinted control RL (HCRMP): a continuous-action driving agent (PPO, Beta policy) whose state is
augmented with hints and whose reward-specific critics (safety, efficiency, comfort) are mixed by hinted weights,
steadied by a knowledge base of validated weights; hints come from a rule oracle, a deliberately noisy oracle or
a language model, through a semantic cache. Writes metrics.jsonl (one line per update), eval.json, kb.json and
policy.pt into the run folder. See docs/hcrmp.md."""
EPILOG = "example: incentive control recipes/control/hcrmp.yaml --set hints.source=noisy --set hints.noise_rate=0.42"

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "control"
"""Bundled control recipes, found by bare name too (``incentive control hcrmp``)."""


def add_parser(sub: Any) -> None:
    """Register ``control`` on the command line's subparsers."""
    p = sub.add_parser(
        "control", help="LLM-hinted control RL (HCRMP) on a driving simulator", description=DESCRIPTION, epilog=EPILOG
    )
    p.add_argument("recipe", help="a control recipe YAML file, or the name of one in recipes/control")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. ppo.total_steps=512"
    )
    p.add_argument("--run-dir", help="run folder (default: run.output_dir/run.name or the recipe's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from incentive.config import ConfigError
    from incentive.control.config import load_control_recipe
    from incentive.control.envs import ENVIRONMENTS, INSTALL_HINT, missing_modules

    path = recipe_path(args.recipe, RECIPES)
    recipe = load_control_recipe(path, args.set)
    missing = missing_modules(ENVIRONMENTS.get(recipe.env.name))
    if missing:
        raise ConfigError(
            f"env.name '{recipe.env.name}' needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}"
        )
    run_dir = Path(args.run_dir) if args.run_dir else Path(recipe.run.output_dir) / (recipe.run.name or path.stem)
    empty_run_dir(run_dir, args.overwrite)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    print(f"[control] run folder: {run_dir}")

    from incentive.control.runner import train

    result = train(recipe, run_dir)
    print(
        f"[control] eval over {result['episodes']} episodes: success {result.get('success_rate', 0):.1%}, "
        f"collisions {result.get('collision_rate', 0):.1%}, mean speed {result.get('mean_speed', 0):.1f} m/s, "
        f"hint calls {result['hint_call_rate']:.1%} of steps, cache hits {result['cache_hit_rate']:.1%}"
    )
    print(f"[control] metrics: {run_dir / 'metrics.jsonl'}; evaluation: {run_dir / 'eval.json'}")
    return 0
