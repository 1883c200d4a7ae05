"""Where an update's time goes: one forward and backward pass of the policy-gradient loss over a fixed batch of
completions on the embedded model, under PyTorch's profiler, grouped into products, attention, the LM head's
log-softmax, element-wise work and the rest.

    .venv/bin/python bench/profile_update.py --prompts 4 --samples 4 --length 1024
    .venv/bin/python bench/profile_update.py --prompts 8 --samples 8 --length 512 --lora
    .venv/bin/python bench/profile_update.py --prompts 8 --samples 8 --length 512 --bf16-products

The completions are random tokens of exactly ``--length`` after chain-sum prompts of the benchmark's kind (the
update's cost does not depend on what the tokens are). Prints the top operators and the grouped shares, and
writes bench/results/profile_update-MACHINE-LENGTH[-bf16].json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from grpo_vs_trl import ROOT, examples, machine_kind

from incentive.config import LoraConfig, ModelConfig, TemplateConfig
from incentive.logprobs import backward_target_logprobs
from incentive.malloc import keep_freed_memory
from incentive.models import load_tokenizer
from incentive.models.bf16_products import bf16_products
from incentive.run import build_template
from incentive.training.policy import build_policy

GROUPS = {
    "products": ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "flash_attention"),
    "head log-softmax": ("incentive_kernels::target_log_softmax", "incentive_kernels::log_softmax"),
}


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if any(name.startswith(p) for p in prefixes):
            return group
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="model.activation_checkpointing")
    parser.add_argument("--bf16-products", action="store_true", help="model.update_products: bfloat16")
    args = parser.parse_args()
    keep_freed_memory()  # as a run does: freed blocks stay in the heap instead of going back to the OS
    torch.manual_seed(0)
    tokenizer = load_tokenizer("embedded")
    policy = build_policy(
        ModelConfig(
            name="embedded",
            lora=LoraConfig(r=16, alpha=32, dropout=0.0) if args.lora else None,
            activation_checkpointing=args.checkpointing,
            update_products="bfloat16" if args.bf16_products else "float32",
        )
    )
    policy.train()
    template = build_template(TemplateConfig())
    prompts = [tokenizer(template.render(e, tokenizer)).input_ids for e in examples(args.prompts)]
    contexts = [p for p in prompts for _ in range(args.samples)]
    targets = [torch.randint(100, 40000, (args.length,)).tolist() for _ in contexts]
    rows = list(range(len(contexts)))

    def loss_of(indices: list[int], logprobs: list[torch.Tensor]) -> torch.Tensor:
        return -sum((lp.sum() for lp in logprobs), torch.zeros(())) / (len(rows) * args.length)

    products = bf16_products() if args.bf16_products else contextlib.nullcontext()
    with products:
        backward_target_logprobs(policy, contexts, targets, rows, loss_of)  # warm-up
        policy.zero_grad()
        start = time.perf_counter()
        with torch.profiler.profile() as prof:
            backward_target_logprobs(policy, contexts, targets, rows, loss_of)
    seconds = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"update {seconds:.1f} s (profiled); " + ", ".join(f"{k} {v / total:.0%}" for k, v in groups.items()))
    kind = machine_kind()
    suffix = "-bf16" if args.bf16_products else ""
    out = ROOT / "bench" / "results" / f"profile_update-{kind['kind']}-{args.length}{suffix}.json"
    out.write_text(
        json.dumps(
            {
                "machine": kind,
                "args": vars(args),
                "update_s": seconds,
                "self_cpu_s": {k: round(v, 3) for k, v in groups.items()},
                "top_ops_s": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in top},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
