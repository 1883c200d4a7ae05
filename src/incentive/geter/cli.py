"""``incentive geter [RECIPE]``: run a GETER recipe (graph, encoder, SFT with the graph token, eval)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from incentive.paths import recipe_path

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "geter"
DEFAULT_RECIPE = RECIPES / "geter.yaml"

DESCRIPTION = """GETER on a synthetic temporal knowledge graph: a seeded event generator, an R-GCN + GRU encoder
trained by link prediction whose pooled embedding of each query and its history becomes one soft token before the
LM's prompt, SFT of the LM (LoRA or full) and the projector on yes/no/unsure + explanation answers, and an eval of
label accuracy and explanation ROUGE-L. encoder.kind: random (a frozen random table) or none (no graph token) are
the ablations. Writes RUN_DIR/metrics.jsonl, eval.json, the data, the policy and the projector."""


def add_parser(sub: Any) -> None:
    """Register ``geter`` on the command line's subparsers."""
    p = sub.add_parser(
        "geter",
        help="graph-conditioned explainable reasoning (GETER) on a synthetic temporal knowledge graph",
        description=DESCRIPTION,
        epilog="example: incentive geter --set encoder.kind=random --set sft.steps=50",
    )
    p.add_argument(
        "recipe", nargs="?", default=str(DEFAULT_RECIPE), help="a YAML file or a bundled recipe's name (default: geter)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. sft.steps=20")
    p.add_argument("--run-dir", help="run folder (default: run.output_dir/run.name, or .../geter)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=cmd_geter)


def cmd_geter(args: argparse.Namespace) -> int:
    from incentive.geter.config import load_config
    from incentive.geter.pipeline import run_geter

    path = recipe_path(args.recipe, RECIPES)
    cfg = load_config(path, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.run.output_dir) / (cfg.run.name or "geter")
    print(f"[geter] run folder: {run_dir}")
    run_geter(cfg, run_dir, args.overwrite)
    print(f"[geter] metrics: {run_dir / 'metrics.jsonl'}; answers: {run_dir / 'eval.json'}")
    return 0
