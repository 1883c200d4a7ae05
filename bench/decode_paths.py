"""Which decode-step path is fastest on this machine: the one-kernel-per-layer step, the op-by-op step with our
product and attention kernels, and the op-by-op step with every product through the model's own linear layers
(MKL or oneDNN), on the embedded model loaded with each linear backend.

    .venv/bin/python bench/decode_paths.py       # writes bench/results/decode_paths-MACHINE.{json,md}

Each case: 4 or 8 prompts of the benchmark's chain-sum kind, G samples each (16 or 64 rows), the prompt
prefilled, then the median of 32 decode steps after 4 warm-up steps (cache positions grow as in sampling).
The cases alternate within each repetition so a drifting machine affects them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from grpo_vs_trl import ROOT, examples, machine_kind

from incentive.config import TemplateConfig
from incentive.engines.decode_step import DecodeStep
from incentive.engines.kv import preallocate
from incentive.logprobs import left_padded
from incentive.models import load_model, load_tokenizer
from incentive.run import build_template

STEPS, WARM_UP = 32, 4


def step_for(model: torch.nn.Module, path: str) -> DecodeStep:
    """The decode step taking ``path``: fused (the default), op-by-op kernels, or op-by-op layers."""
    step = DecodeStep.for_model(model)
    if path != "fused":
        for layer in step.layers:
            layer.fused = None
    if path == "layers":
        for layer in step.layers:
            for projections in (layer.qkv, layer.o, layer.mlp.gate_up, layer.mlp.down):
                projections.plain = None
        step.project_head.plain = None
    return step


@torch.no_grad()
def median_step_ms(model: torch.nn.Module, step: DecodeStep, contexts: list[list[int]], samples: int) -> float:
    ids, mask, positions = left_padded(contexts)
    cache, _, logits = step.prefill(ids, mask, positions)
    owner = torch.arange(len(contexts)).repeat_interleave(samples)
    cache = preallocate(cache, owner, STEPS + WARM_UP)
    mask, pos = mask[owner], torch.tensor([len(c) for c in contexts])[owner]
    tokens = logits[owner].argmax(-1)
    times = []
    for k in range(STEPS + WARM_UP):
        mask = torch.cat([mask, mask.new_ones(len(owner), 1)], dim=1)
        start = time.perf_counter()
        tokens = step(tokens, pos, mask, cache).argmax(-1)
        if k >= WARM_UP:
            times.append(time.perf_counter() - start)
        pos = pos + 1
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    tokenizer = load_tokenizer("embedded")
    template = build_template(TemplateConfig())
    prompts = [tokenizer(template.render(e, tokenizer), add_special_tokens=False).input_ids for e in examples(8)]
    models = {backend: load_model("embedded", onednn=backend == "onednn") for backend in ("mkl", "onednn")}
    cases = [
        (backend, path, rows)
        for rows in ((4, 4), (8, 8))
        for backend in models
        for path in ("fused", "kernels", "layers")
    ]
    times: dict[str, list[float]] = {}
    for rep in range(args.reps):
        for backend, path, (n_prompts, samples) in cases:
            key = f"{backend}/{path}/{n_prompts * samples} rows"
            model = models[backend]
            ms = median_step_ms(model, step_for(model, path), prompts[:n_prompts], samples)
            times.setdefault(key, []).append(ms)
            print(f"[decode_paths] rep {rep + 1}/{args.reps} {key}: {ms:.1f} ms", flush=True)
    kind = machine_kind()
    results = {
        "machine": kind,
        "threads": torch.get_num_threads(),
        "median_step_ms": {key: statistics.median(v) for key, v in times.items()},
        "raw_ms": times,
    }
    target = ROOT / "bench" / "results"
    stem = f"decode_paths-{kind['kind']}"
    (target / f"{stem}.json").write_text(json.dumps(results, indent=2))
    lines = [f"Machine: {kind['model_name']} ({kind['kind']}); decode step of the embedded model, median ms.", ""]
    lines += ["| rows | backend | one kernel per layer | op by op, our kernels | op by op, the layers |", "|---|---|---|---|---|"]
    for rows in (16, 64):
        for backend in models:
            cells = [f"{results['median_step_ms'][f'{backend}/{path}/{rows} rows']:.1f}" for path in ("fused", "kernels", "layers")]
            lines.append(f"| {rows} | {backend} | " + " | ".join(cells) + " |")
    (target / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
