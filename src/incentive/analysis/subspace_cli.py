"""``incentive analyze subspaces BASE ALIGNED TUNED [TUNED ...]``: its options, and the run that turns them
into a :class:`~incentive.analysis.subspaces.Request`, analyses, writes and prints the overlap table. Imports
nothing heavy until it runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from incentive.cli import at_least, number_in

if TYPE_CHECKING:
    from incentive.analysis.subspaces import Request

DESCRIPTION = """Safety-subspace analysis. From BASE, ALIGNED and one or more TUNED checkpoints (full-weight
folders, LoRA adapter folders merged onto their base, toolkit checkpoint or run folders, or model names) it
takes the alignment update ALIGNED - BASE and each fine-tune's update TUNED - ALIGNED, finds each update's
principal directions per tensor (top singular vectors, by energy fraction or a fixed k), and measures the Mode
Subspace Overlap of every pair of updates against the overlap random subspaces of the same dimensions would
have. Optionally: the overlap of the hidden-state directions of two prompt sets (--activations), and each
fine-tune projected onto, against or away from the alignment update's top-k directions (--project), written as
checkpoints `incentive eval` loads (--write). Writes subspaces.json (per tensor and aggregated), plots, and
activations.json / projection.json when asked. See docs/safety-subspaces.md."""
EPILOG = (
    "example: incentive analyze subspaces embedded runs/aligned runs/useful runs/harmful --out subspaces/a; "
    "incentive analyze subspaces embedded runs/aligned runs/harmful --project away --k 8 --write projected"
)


def add_parser(sub: Any) -> None:
    """Register ``subspaces`` on the ``analyze`` group's subparsers."""
    p = sub.add_parser(
        "subspaces",
        help="overlap of the weight-update (and activation) subspaces of aligned and fine-tuned checkpoints",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument("base", metavar="BASE", help="the model before alignment")
    p.add_argument("aligned", metavar="ALIGNED", help="the aligned model (its update: ALIGNED - BASE)")
    p.add_argument(
        "tuned", nargs="+", metavar="TUNED", help="fine-tunes of ALIGNED (updates: TUNED - ALIGNED)"
    )
    p.add_argument(
        "--labels", nargs="+", metavar="NAME", help="names of the TUNED updates (default: folder names)"
    )
    p.add_argument(
        "--eta",
        type=number_in(0, 1, low_open=True),
        nargs="+",
        metavar="E",
        help="energy fractions: each subspace is the fewest directions holding E of the update's energy "
        "(default: 0.01 0.1 0.2 ... 0.9 0.99)",
    )
    p.add_argument(
        "--k",
        type=at_least(1),
        help="a fixed number of directions per tensor instead of --eta; with --project: the projection's k",
    )
    p.add_argument(
        "--tensors", metavar="REGEX", help="only tensors whose name matches (searched), e.g. 'mlp|attn'"
    )
    p.add_argument(
        "--layers", metavar="SPEC", help="only these decoder layers: '0,3,5-7' or a depth range '0.5-1.0'"
    )
    p.add_argument("--vectors", action="store_true", help="also overlap 1-D tensors (norms, biases) as n x 1")
    p.add_argument(
        "--granularity",
        choices=["tensor", "layer"],
        default="tensor",
        help="one overlap per tensor, or per layer (its tensors of one column count, rows stacked)",
    )
    p.add_argument(
        "--svd",
        choices=["auto", "full", "lowrank"],
        default="auto",
        help="auto: full SVD unless a side exceeds 10000, then randomized (q = min(m, n)/4)",
    )
    p.add_argument(
        "--random-samples",
        type=at_least(0),
        default=0,
        help="also estimate the random baseline from this many random subspace pairs (0: analytic only)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (SVD sketches, baselines)")
    act = p.add_argument_group("activation subspaces")
    act.add_argument(
        "--activations", nargs=2, metavar=("PROMPTS_A", "PROMPTS_B"), help="two prompt files (.jsonl or .txt)"
    )
    act.add_argument(
        "--activation-layers",
        default="0.65-0.9",
        metavar="SPEC",
        help="hidden states (0: embeddings): indices '4,8-10' or a depth range (default 0.65-0.9)",
    )
    act.add_argument(
        "--activation-eta",
        type=number_in(0, 1, low_open=True),
        nargs="+",
        metavar="E",
        help="energy fractions of the activation subspaces (default: 0.01 0.1 ... 0.6)",
    )
    act.add_argument("--pool", choices=["last", "mean"], default="last", help="last real token, or mean")
    act.add_argument("--center", action="store_true", help="mean-centre each prompt set's states first")
    act.add_argument("--max-prompts", type=at_least(2), help="prompts per file at most")
    act.add_argument("--batch-size", type=at_least(1), default=16, help="prompts per forward pass")
    act.add_argument("--max-length", type=at_least(1), default=256, help="tokens per prompt at most")
    act.add_argument("--chat-template", action="store_true", help="wrap each prompt in the chat template")
    proj = p.add_argument_group("projection")
    proj.add_argument(
        "--project",
        choices=["onto", "away", "opposite"],
        help="project each TUNED update onto (W_A + U_par), away from (W_A + U - U_par) or against "
        "(W_A - U_par) the alignment update's top directions",
    )
    proj.add_argument(
        "--frac", type=number_in(0, 1, low_open=True), help="instead of --k: k = round(F * min(m, n))"
    )
    proj.add_argument(
        "--basis",
        choices=["topk", "randomk", "random"],
        default="topk",
        help="topk; controls: randomk (k of the alignment update's directions at random), random (a random "
        "subspace)",
    )
    proj.add_argument("--write", metavar="DIR", help="write each projected TUNED as a checkpoint DIR/<label>")
    p.add_argument("--out", metavar="DIR", default="subspaces", help="folder for the JSON files and plots")
    p.set_defaults(func=run)


def request_from(args: argparse.Namespace) -> Request:
    """The analysis the options ask for (refusing options that do not go together)."""
    from incentive.analysis.subspaces import (
        ACTIVATION_ETAS,
        ETAS,
        ActivationSettings,
        MsoSettings,
        ProjectionPlan,
        Request,
        SubspaceError,
    )

    if args.project is None and (args.frac is not None or args.write is not None or args.basis != "topk"):
        raise SubspaceError("--frac, --write and --basis belong to --project")
    plan = None
    if args.project is not None:
        if args.frac is None and args.k is None:
            raise SubspaceError("--project needs --k or --frac (the number of directions)")
        if args.frac is not None and args.k is not None:
            raise SubspaceError("--project takes --k or --frac, not both")
        plan = ProjectionPlan(args.project, args.basis, args.k, args.frac, args.svd, args.seed)
    if args.project is None and args.k is not None and args.eta is not None:
        raise SubspaceError("--k and --eta both choose the overlaps' subspaces: give one")
    if args.random_samples == 1:
        raise SubspaceError("--random-samples needs at least 2 samples (or 0 for the analytic baseline only)")
    mso_k = None if args.project is not None else args.k
    mso = MsoSettings(tuple(args.eta or ETAS), mso_k, args.svd, args.random_samples, args.seed)
    activation = ActivationSettings(
        etas=tuple(args.activation_eta or ACTIVATION_ETAS),
        pool=args.pool,
        center=args.center,
        batch_size=args.batch_size,
        max_length=args.max_length,
        chat_template=args.chat_template,
    )
    return Request(
        base=args.base,
        aligned=args.aligned,
        tuned=tuple(args.tuned),
        out=Path(args.out),
        labels=tuple(args.labels) if args.labels else None,
        mso=mso,
        tensors=args.tensors,
        layers=args.layers,
        vectors=args.vectors,
        granularity=args.granularity,
        activations=tuple(args.activations) if args.activations else None,
        activation_layers=args.activation_layers,
        activation=activation,
        max_prompts=args.max_prompts,
        projection=plan,
        write=Path(args.write) if args.write else None,
    )


def run(args: argparse.Namespace) -> int:
    """The command: analyse, write, print the table and where the files went; bad input is one error line."""
    from incentive.analysis.subspaces import SubspaceError, activation_lines, analyze, summary_lines

    try:
        results = analyze(request_from(args))
    except SubspaceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(results["overlap"])))
    if "activations" in results:
        print("\n".join(activation_lines(results["activations"])))
    for label, projected in results.get("projection", {}).items():
        plan, kept = projected["plan"], projected["energy_kept"]
        energy = "its update is zero" if kept is None else f"energy kept {kept:.3f}"
        where = f", written to {projected['written']}" if projected["written"] else ""
        print(f"[incentive] {label} projected {plan['mode']} ({plan['basis']}): {energy}{where}")
    print(f"[incentive] wrote {', '.join(str(p) for p in results['written'].values())}")
    return 0
