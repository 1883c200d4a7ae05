"""``silu(gate) * up`` (the activation of Llama-family MLPs) as one kernel each way (``swiglu.cpp``), with a
PyTorch fallback where the kernels are not built (:mod:`incentive.kernels.build`) or the tensors are not fp32
on the CPU.

PyTorch computes it as ``silu`` and a product, saving ``gate``, ``silu(gate)`` and ``up``, and differentiates it
with two products and ``silu_backward``; the autograd function here saves ``gate`` and ``up`` only and makes
both gradients in one pass. Results agree with PyTorch's to fp32 rounding (the exp differs in the last bits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from incentive.kernels import build


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, ops: Any) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.ops = ops
        return ops.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        d_gate, d_up = ctx.ops.swiglu_backward(grad, gate, up)
        return d_gate, d_up, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``, through the kernel where it applies."""
    ops = build.ops_for(gate, up)
    if ops is None or gate.shape != up.shape:
        return F.silu(gate) * up
    return _SwiGLU.apply(gate, up, ops)
