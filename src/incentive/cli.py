"""Command line: ``incentive train RECIPE``, ``incentive eval``, ``incentive recipes``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def _recipe_path(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    candidate = RECIPES_DIR / f"{name}.yaml"
    return candidate if candidate.exists() else path


def cmd_train(args: argparse.Namespace) -> int:
    from incentive.config import load_recipe
    from incentive.run import Run

    path = _recipe_path(args.recipe)
    recipe = load_recipe(path, args.set)
    run_dir = (
        Path(args.run_dir) if args.run_dir else Path(recipe.run.output_dir) / (recipe.run.name or path.stem)
    )
    run = Run(recipe, run_dir, resume=args.resume, overwrite=args.overwrite)
    print(f"[incentive] run folder: {run_dir}")
    summary = run.execute()
    if summary:
        print("\nHeld-out accuracy (verifier), by stage:")
        for stage, values in summary.items():
            print(
                f"  {stage:>10}: accuracy {values['accuracy']:6.1%}   format {values['format_rate']:6.1%}   "
                f"mean length {values['length_mean']:5.1f}"
            )
    print(f"[incentive] metrics: {run_dir / 'metrics.jsonl'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from incentive.config import TemplateConfig
    from incentive.data import DataConfig, load_examples
    from incentive.engines.hf import SamplingParams
    from incentive.evaluation import evaluate
    from incentive.models import load_tokenizer
    from incentive.run import build_template
    from incentive.training.policy import load_model_for_eval

    data = DataConfig(source=args.data, size=args.size, seed=args.seed)
    examples = load_examples(data).examples
    template = build_template(TemplateConfig(name=args.template))
    model = load_model_for_eval(args.model)
    tokenizer = load_tokenizer(args.model)
    params = SamplingParams(args.samples, args.max_new_tokens, args.temperature)
    result = evaluate(model, tokenizer, template, examples, params)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    import yaml

    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{path.stem:<24} {description.strip().splitlines()[0] if description else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="incentive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a recipe (SFT and/or RL)")
    train.add_argument(
        "recipe", help="a YAML file, or the name of a bundled recipe (see `incentive recipes`)"
    )
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. rl.steps=5"
    )
    train.add_argument("--run-dir", help="run folder (default: run.output_dir/run.name)")
    train.add_argument("--resume", action="store_true", help="continue the run in the run folder")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model, checkpoint or adapter on a data set or task")
    ev.add_argument("--model", default="embedded", help="model name/path, or a checkpoint's policy folder")
    ev.add_argument("--data", required=True, help="file or task:<reasoning-gym name>")
    ev.add_argument("--size", type=int, default=None)
    ev.add_argument("--seed", type=int, default=1)
    ev.add_argument("--template", default="think-answer")
    ev.add_argument("--samples", type=int, default=1)
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--out", help="write the full result (with sample completions) as JSON here")
    ev.set_defaults(func=cmd_eval)

    rec = sub.add_parser("recipes", help="list bundled recipes")
    rec.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from incentive.config import ConfigError
    from incentive.data import DataError
    from incentive.models import ModelLoadError
    from incentive.run import RunError
    from incentive.training.rl import TooManyFailures
    from incentive.training.signals import StopRequested

    try:
        return args.func(args)
    except StopRequested as err:
        print(f"[incentive] {err}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, ModelLoadError, RunError, TooManyFailures) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
