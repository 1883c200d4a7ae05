"""Sampling from a bfloat16 copy of the policy, where the CPU has bf16 matrix units (Intel AMX).

Decoding 16 rows is a chain of small-row products, which MKL runs far below the CPU's peak in fp32: the
embedded model's linear layers take ~50 ms per step on a 2-core Sapphire Rapids VM, ~28 ms in bf16. The copy is the
policy's architecture in bf16 (a LoRA policy's adapter merged in), loaded from the live weights before the
first rollout and again after each update (``Engine.weights_changed``). Completions then come from rounded
weights: the trainer still scores them with the fp32 policy, as verl and OpenRLHF score bf16 vLLM rollouts.
On CPUs without AMX the copy's bf16 products (MKL's, through ``F.linear``) are ~50x slower than fp32 (measured
on an AMD EPYC), so the option is refused there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from incentive.cpu import CPUINFO, cpu_flags
from incentive.models.lora import base_model


def has_bf16_units(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (the ``amx_bf16`` flag)."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def require_bf16_units() -> None:
    """Refuse bf16 sampling on a CPU without bf16 matrix units, before any model is loaded."""
    if not has_bf16_units():
        raise ValueError(
            "generation.sampling_dtype: bfloat16 needs a CPU with AMX bf16 units (flag amx_bf16 in "
            "/proc/cpuinfo); on this CPU bf16 products are far slower than fp32. Use sampling_dtype: float32"
        )


class LowPrecisionCopy:
    """A copy of the policy in ``dtype`` for sampling, reloaded from the policy when marked stale."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self.copy: PreTrainedModel | None = None
        self.stale = True

    def mark_stale(self) -> None:
        self.stale = True

    @torch.no_grad()
    def model_for(self, policy: PreTrainedModel) -> PreTrainedModel:
        """The copy holding ``policy``'s current weights. A LoRA policy must be inside
        :func:`incentive.engines.merged.merged_lora`, so that its base layers hold the merged weights."""
        base = base_model(policy)
        if self.copy is None:
            self.copy = AutoModelForCausalLM.from_config(
                base.config, dtype=self.dtype, attn_implementation="sdpa"
            ).eval()
            self.stale = True
        if self.stale:
            weights = {
                name.replace(".base_layer", ""): tensor
                for name, tensor in base.state_dict().items()
                if ".lora_" not in name
            }
            self.copy.load_state_dict(weights)
            self.stale = False
        return self.copy
