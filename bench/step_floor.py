"""The least time a GRPO step of a benchmarked workload can take on this CPU: its linear products alone, each at
the best rate this machine reaches for that shape, nothing else counted.

    .venv/bin/python bench/step_floor.py bench/results/grpo_vs_trl-long-amd-epyc-bf16-update.json

Reads the workload (model, prompts, completions, tokens per step) and both tools' measured steps from a
``grpo_vs_trl.py`` result, then times every distinct weight shape of the model:

- the rollout: one forward product per sampled token over the batch's rows (all rows run every decode step when
  the workload forces its full length), through MKL, oneDNN and the small-row kernel in fp32, oneDNN in bf16;
- the update (full fine-tuning): forward, input-gradient and weight-gradient products over every update token,
  in chunks of the recipe's 2048-token micro-batch, through MKL and oneDNN in fp32, oneDNN in bf16.

Each product is timed on ready operands (no rounding to bf16, no copies) and the fastest of its ways is taken.
Attention, norms, the softmax over the vocabulary, sampling and the optimizer are left out, so the floor is a
lower bound of any implementation that does the same arithmetic, in fp32 or with bf16 products (TRL's
``bf16=True``). Writes bench/results/step_floor-MACHINE-WORKLOAD.json and prints the comparison with TRL's best
step divided by three (the issue's target).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from grpo_vs_trl import ROOT, machine_kind
from torch.nn import functional as F

from incentive.kernels import build, small_rows
from incentive.models import load_model
from incentive.models.onednn import onednn_available

MICRO_BATCH = 2048
"""Update tokens per product (the recipe's default ``rl.micro_batch_tokens``)."""


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    """The fastest of ``reps`` timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_ways(rows: int, w: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The ways of computing one decode step's product ``x wᵀ`` for ``rows`` rows, by name."""
    x = torch.randn(rows, w.shape[1])
    ways: dict[str, Callable[[], object]] = {"mkl fp32": lambda: F.linear(x, w)}
    if onednn_available():
        xb, wb = x.bfloat16(), w.bfloat16()
        ways["onednn fp32"] = lambda: onednn(x, w)
        ways["onednn bf16"] = lambda: onednn(xb, wb)
    if build.ops_for(x, w) is not None and rows <= small_rows.max_rows():
        ways["kernel fp32"] = lambda: build.kernel_ops().small_rows_linear(x, [w])
    return ways


def update_ways(rows: int, w: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The ways of computing an update chunk's three products (output, input gradient, weight gradient)."""
    x, dy = torch.randn(rows, w.shape[1]), torch.randn(rows, w.shape[0])
    ways: dict[str, Callable[[], object]] = {"mkl fp32": lambda: (x @ w.t(), dy @ w, dy.t() @ x)}
    if onednn_available():
        xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
        ways["onednn fp32"] = lambda: (onednn(x, w), onednn(dy, w.t()), onednn(dy.t(), x.t()))
        ways["onednn bf16"] = lambda: (onednn(xb, wb), onednn(dyb, wb.t()), onednn(dyb.t(), xb.t()))
    return ways


def weight_shapes(model: torch.nn.Module) -> Counter[tuple[int, int]]:
    """How many product weights of each [out, in] shape one token passes through: every linear layer and the
    output head (tied to the embedding or not)."""
    return Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear))


def timed(shapes: Counter[tuple[int, int]], rows: int, ways_of: Callable, reps: int) -> dict[str, dict]:
    """Per weight shape and way: seconds for one call of ``rows`` rows."""
    out: dict[str, dict] = {}
    for shape in shapes:
        w = torch.randn(*shape)
        out[f"{shape[0]}x{shape[1]}"] = {name: best_seconds(fn, reps) for name, fn in ways_of(rows, w).items()}
    return out


def floor_seconds(
    shapes: Counter[tuple[int, int]], times: dict[str, dict], calls: float, precision: str | None
) -> float:
    """``calls`` calls of every weight at the fastest way (of ``precision`` only, when given)."""
    total = 0.0
    for shape, count in shapes.items():
        ways = times[f"{shape[0]}x{shape[1]}"]
        total += count * calls * min(s for name, s in ways.items() if precision is None or name.endswith(precision))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="a bench/grpo_vs_trl.py result JSON")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    work = result["workload"]
    settings = result["variants"]["full"]["settings"]
    trl_best = min(s["trl"]["median_step_s"] for s in settings.values())
    incentive_best = min(s["incentive"]["median_step_s"] for s in settings.values())
    raw = next(iter(settings.values()))["raw"]["incentive"][0]
    new_tokens = max(raw["gen_tokens"]) / (work["prompts"] * work["generations"])
    update_tokens = max(raw["gen_tokens"]) + max(raw["context_tokens"])

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = load_model(work["model"], onednn=False)
    shapes = weight_shapes(model)
    del model
    rows = work["prompts"] * work["generations"]
    print(f"[floor] weights {dict(shapes)}; rollout {rows} rows x {new_tokens:.0f} tokens; update {update_tokens}")
    decode = timed(shapes, rows, decode_ways, args.reps)
    update = timed(shapes, MICRO_BATCH, update_ways, args.reps)
    chunks = update_tokens / MICRO_BATCH
    floors = {
        precision or "any": {
            "rollout_s": floor_seconds(shapes, decode, new_tokens, precision),
            "update_s": floor_seconds(shapes, update, chunks, precision),
        }
        for precision in ("fp32", "bf16", None)
    }
    for f in floors.values():
        f["step_s"] = f["rollout_s"] + f["update_s"]
    report = {
        "machine": {**machine_kind(), "cpu_threads": torch.get_num_threads()},
        "source": str(args.result.relative_to(ROOT) if args.result.is_absolute() else args.result),
        "workload": work,
        "rollout_rows": rows,
        "new_tokens_per_row": new_tokens,
        "update_tokens": update_tokens,
        "weights": {f"{s[0]}x{s[1]}": n for s, n in shapes.items()},
        "decode_call_s": decode,
        "update_chunk_s": {"rows": MICRO_BATCH, **update},
        "floor": floors,
        "trl_best_step_s": trl_best,
        "incentive_best_step_s": incentive_best,
        "target_step_s": trl_best / 3,
    }
    name = f"step_floor-{report['machine']['kind']}-{work['name']}.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(report, indent=1) + "\n")
    print(f"[floor] TRL's best step {trl_best:.1f} s, a third of it {trl_best / 3:.1f} s; incentive {incentive_best:.1f} s")
    for precision, f in floors.items():
        print(
            f"[floor] products in {precision}: rollout {f['rollout_s']:.1f} s + update {f['update_s']:.1f} s = "
            f"{f['step_s']:.1f} s ({f['step_s'] / (trl_best / 3):.2f} of the target)"
        )
    print(f"[floor] wrote bench/results/{name}")


if __name__ == "__main__":
    main()
