"""Sampling from a LoRA policy with its adapter folded into fresh copies of the base weights: one matmul per
layer instead of three small ones. The original base weights are put back untouched (no merge/unmerge
arithmetic on them, so they never drift)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from incentive.models.lora import is_lora


@contextmanager
def merged_lora(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model`` computes W + ΔW of its active adapter with the adapter layers switched off; a
    model without LoRA is left as it is."""
    if not is_lora(model):
        yield
        return
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    swapped: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    base = module.get_base_layer()
                    merged = base.weight + module.get_delta_weight(adapter).to(base.weight.dtype)
                    swapped.append((base, base.weight))
                    base.weight = torch.nn.Parameter(merged, requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for base, original in swapped:
            base.weight = original
