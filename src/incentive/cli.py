"""Command line: ``incentive train RECIPE``, ``incentive eval``, ``incentive compare``, ``incentive report``,
``incentive recipes``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from incentive.paths import RECIPES_DIR, recipe_path

EVAL_FLAGS = {
    "source": "--data",
    "size": "--size",
    "seed": "--seed",
    "task_args": "--task-args",
    "prompt_field": "--prompt-field",
    "reference_field": "--reference-field",
    "on_error": "--on-error",
    "name": "--template",
}
"""The eval flag each DataConfig / TemplateConfig field comes from, to name it in an error."""


def _eval_flag(loc: tuple[str | int, ...]) -> str:
    """The flag behind a config error's location; none for a check of the whole config."""
    return EVAL_FLAGS.get(str(loc[0]), str(loc[0])) if loc else ""


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one ``error:`` line and exit code 2, like the command's other refusals
    (argparse's own print the usage first, which for ``eval`` is a dozen lines)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, so a bad flag fails at parsing, named, before models load."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def number_in(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` (excluded with ``low_open``) up to ``high``."""
    bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}")
        return value

    return parse


def cmd_train(args: argparse.Namespace) -> int:
    from incentive.config import load_recipe
    from incentive.run import Run

    path = recipe_path(args.recipe)
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
    if run.comparison:
        print("\n".join(stage_comparison_lines(run.comparison)))
    print(f"[incentive] metrics: {run_dir / 'metrics.jsonl'}")
    return 0


def stage_comparison_lines(result: dict[str, Any]) -> list[str]:
    """RL against the stage it started from, in two lines: the paired difference, its interval and its test."""
    low, high = result["ci"]
    verdict = "significant at 5 %" if result["significant"] else "not significant at 5 % (within noise)"
    return [
        f"\n{result['b_stage'].upper()} - {result['a_stage'].upper()} on the same {result['prompts']} prompts: "
        f"{result['diff'] * 100:+.1f} points, 95% CI {low * 100:+.1f} to {high * 100:+.1f} ({result['ci_method']})",
        f"  {result['test']}: RL better on {result['b_better']} prompts, worse on {result['a_better']}, "
        f"p = {result['p_value']:.3g}: {verdict}",
    ]


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from pydantic import ValidationError

    from incentive.config import ConfigError, TemplateConfig, explain, load_yaml
    from incentive.data import DataConfig, fit_to_context, load_examples
    from incentive.engines import SamplingParams
    from incentive.evaluation import build_verifier, evaluate, headline, markdown_report, write_report
    from incentive.models import context_length, load_tokenizer
    from incentive.models.lora import adapter_base
    from incentive.plugins import import_plugin
    from incentive.run import build_template
    from incentive.training.policy import load_model_for_eval

    for entry in args.imports:
        try:
            import_plugin(entry, Path.cwd())
        except ValueError as err:
            raise ConfigError(f"--import: {err}") from err
    ks = sorted(set(args.k))
    if ks[-1] > args.samples:
        raise ConfigError(f"--k values must be between 1 and --samples ({args.samples}); got {ks}")
    task_args = load_yaml(args.task_args, "--task-args") if args.task_args else {}
    if not isinstance(task_args, dict):
        raise ConfigError(f"--task-args must be a mapping, e.g. '{{min_terms: 2}}'; got {args.task_args!r}")
    try:
        data = DataConfig(
            source=args.data,
            size=args.size,
            seed=args.seed,
            task_args=task_args,
            prompt_field=args.prompt_field,
            reference_field=args.reference_field,
            on_error=args.on_error,
        )
        template_cfg = TemplateConfig(name=args.template)
        verifier = build_verifier(args.verifier, args.judge, args.judge_max_new_tokens)
    except ValidationError as err:
        raise ConfigError(explain(err, DataConfig, key=_eval_flag)) from err
    except ValueError as err:
        raise ConfigError(str(err)) from err
    loaded = load_examples(data)
    if loaded.skipped:
        print(f"[incentive] skipped {len(loaded.skipped)} bad rows, e.g. {loaded.skipped[0]}")
    examples = loaded.examples
    template = build_template(template_cfg)
    base = adapter_base(args.model)
    tokenizer = load_tokenizer(base or args.model)  # a LoRA adapter uses its base model's tokenizer
    examples, too_long = fit_to_context(
        examples,
        data,
        lambda e: len(tokenizer(template.render(e, tokenizer)).input_ids),
        args.max_new_tokens,
        context_length(base or args.model),
    )
    if too_long:
        print(f"[incentive] skipped {len(too_long)} prompts too long for the model, e.g. {too_long[0]}")
    model = load_model_for_eval(args.model)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 1.0)
    params = SamplingParams(args.samples, args.max_new_tokens, temperature, args.top_p)
    torch.manual_seed(args.sampling_seed)
    result = evaluate(
        model, tokenizer, template, examples, params, args.batch_size, verifier, ks, progress=True
    )
    result.update(
        model=args.model,
        data=args.data,
        verifier=args.verifier,
        samples=args.samples,
        temperature=temperature,
        seed=args.seed,
        sampling_seed=args.sampling_seed,
    )
    print(json.dumps({k: v for k, v in result.items() if k not in ("examples", "per_prompt")}, indent=2))
    print(markdown_report(result))
    print("\n".join(headline(result)))
    if args.out:
        json_path, md_path, lines_path = write_report(result, Path(args.out))
        print(f"[incentive] wrote {json_path}, {md_path} and {lines_path} (every completion, per prompt)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from incentive.evaluation import EvalFileError, compare, compare_lines

    try:
        result = compare(Path(args.eval_a), Path(args.eval_b), args.metric)
    except EvalFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else "\n".join(compare_lines(result)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from incentive.report import ReportError, default_out, write_report

    run_dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else default_out(run_dirs)
    try:
        html = write_report(run_dirs, out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[incentive] report: {html} (plots as PNG files beside it)")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    import yaml

    # recipes of the other commands sit in a folder named for theirs (recipes/control: incentive control ...)
    for path in sorted(RECIPES_DIR.glob("*.yaml")) + sorted(RECIPES_DIR.glob("*/*.yaml")):
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        name = path.stem if path.parent == RECIPES_DIR else f"{path.stem} (incentive {path.parent.name})"
        print(f"{name:<24} {description.strip().splitlines()[0] if description else ''}")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from incentive.analysis.data_cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="incentive", description=__doc__)
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

    ev = sub.add_parser(
        "eval",
        help="evaluate a model, checkpoint or LoRA adapter on a data set or task (accuracy, pass@k, ...)",
    )
    ev.add_argument(
        "--model", default="embedded", help="model name/path, a checkpoint's policy folder, an adapter"
    )
    ev.add_argument("--data", required=True, help="file (jsonl/csv/parquet) or task:<reasoning-gym name>")
    ev.add_argument(
        "--size", type=at_least(1), default=None, help="examples (a task's default: 100; a file: all)"
    )
    ev.add_argument("--seed", type=int, default=1, help="task seed (which examples a task makes)")
    ev.add_argument(
        "--sampling-seed", type=int, default=0, help="seed of the sampling, apart from --seed's task data"
    )
    ev.add_argument(
        "--task-args", help="reasoning-gym task settings as YAML, e.g. '{min_terms: 2, max_terms: 3}'"
    )
    ev.add_argument("--prompt-field", default="prompt", help="a file's prompt column")
    ev.add_argument("--reference-field", default="reference", help="a file's reference column")
    ev.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="a bad row (or a prompt too long for the model) stops the eval, or is left out and counted",
    )
    ev.add_argument("--template", default="think-answer")
    ev.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="PLUGIN",
        help="a .py file or module name whose parts (e.g. a template) to register first; repeatable",
    )
    ev.add_argument("--samples", type=at_least(1), default=1, help="samples per prompt (n of pass@k)")
    ev.add_argument(
        "--k", type=at_least(1), nargs="+", default=[1], help="pass@k for these k (each <= --samples)"
    )
    ev.add_argument(
        "--temperature", type=number_in(0), default=None, help="default: 0 for one sample, else 1"
    )
    ev.add_argument("--top-p", type=number_in(0, 1, low_open=True), default=1.0)
    ev.add_argument("--max-new-tokens", type=at_least(1), default=64)
    ev.add_argument("--batch-size", type=at_least(1), default=32, help="sequences generated at once")
    ev.add_argument(
        "--verifier", choices=["rule", "accepted_wordings", "tinyv", "general_reasoner"], default="rule"
    )
    ev.add_argument(
        "--judge", default="embedded", help="judge model of the tinyv / general_reasoner verifiers"
    )
    ev.add_argument(
        "--judge-max-new-tokens", type=at_least(1), default=None, help="default: the verifier's own"
    )
    ev.add_argument(
        "--out", help="a folder (eval.json + eval.md), or a .json path (a .md is written beside it)"
    )
    ev.set_defaults(func=cmd_eval)

    cmp = sub.add_parser(
        "compare",
        help="paired comparison of two evals over the same prompts (difference, 95%% CI, p-value)",
        description="Compare two `incentive eval --out` outputs (a folder, its eval.json, or its "
        "eval.completions.jsonl) prompt by prompt, matched by prompt id: B - A with a 95% interval, a paired "
        "test (McNemar exact for one sample per prompt, else the sign test over prompts) and whether the "
        "difference is significant at 5%. Prompts that do not match are refused.",
        epilog="example: incentive compare runs/demo/evals/base.completions.jsonl runs/demo/evals/rl.completions.jsonl",
    )
    cmp.add_argument("eval_a", metavar="EVAL_A", help="the baseline eval output")
    cmp.add_argument("eval_b", metavar="EVAL_B", help="the eval output compared with it")
    cmp.add_argument(
        "--metric",
        choices=["strict", "lenient", "format"],
        default="strict",
        help="strict accuracy, correctness regardless of format, or format rate (default: strict)",
    )
    cmp.add_argument("--json", action="store_true", help="print the comparison as JSON")
    cmp.set_defaults(func=cmd_compare)

    report = sub.add_parser(
        "report",
        help="an HTML report (plots, sample completions) of one run, or several overlaid for comparison",
        description="Write RUN_DIR/report/report.html (one run) or ./report/report.html (several runs, one "
        "line per run, labelled by folder name) and a PNG per plot beside it: reward per component, held-out "
        "accuracy, completion and reasoning length, KL and clip fraction, throughput, failures by reason, "
        "SFT loss, and a per-step browser of the logged completions with their rewards. The page is "
        "self-contained: it opens offline and can be mailed as one file.",
        epilog="example: incentive report runs/grpo runs/nover --out reports/grpo-vs-nover",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) holding metrics.jsonl")
    report.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/report, or ./report)")
    report.set_defaults(func=cmd_report)

    from incentive.analysis.data_cli import add_parser as add_data_stats

    add_data_stats(sub, cmd_data_stats)

    from incentive.analysis.subspace_cli import add_parser as add_subspaces

    analyze = sub.add_parser("analyze", help="measurements on checkpoints (subspaces: safety-subspace overlap)")
    add_subspaces(analyze.add_subparsers(dest="tool", required=True, metavar="TOOL"))

    from incentive.control.cli import add_parser as add_control

    add_control(sub)

    from incentive.geter.cli import add_parser as add_geter

    add_geter(sub)

    rec = sub.add_parser("recipes", help="list bundled recipes")
    rec.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from incentive.config import ConfigError
    from incentive.data import DataError
    from incentive.models import ModelLoadError
    from incentive.run import RunError
    from incentive.training import signals
    from incentive.training.signals import StopRequested, ignore_stop_signals
    from incentive.training.stage import StageStateMismatch, StepFailed

    signals.exiting_on_stop = True
    try:
        return args.func(args)
    except StopRequested as err:
        ignore_stop_signals()
        print(f"[incentive] {err}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, ModelLoadError, RunError, StepFailed, StageStateMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
