"""Rotary position embedding of [tokens, heads, head_dim] queries or keys as one kernel each way
(``rotary.cpp``), for the packed training body (:mod:`incentive.models.packed_body`); the model's own
``apply_rotary_pos_emb`` where the kernels are not built (:mod:`incentive.kernels.build`) or the tensors are not
fp32 on the CPU.

transformers' ``x * cos + rotate_half(x) * sin`` is five element-wise ops each way, ~2.8 ms forward and
backward per layer for the 611 completion tokens of a benchmark step (~85 ms of the update); the kernel makes
the same numbers, bit for bit, in one pass each way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from incentive.kernels import build


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: Any) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.ops = ops
        return ops.rotary_forward(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        return ctx.ops.rotary_backward(grad, cos, sin), None, None, None


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    fallback: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` and ``k`` ([tokens, heads, head_dim]) rotated by ``cos`` and ``sin`` ([tokens, head_dim]); the
    model's ``fallback(q, k, cos, sin, unsqueeze_dim=1)`` where the kernel does not apply. Gradients flow to
    ``q`` and ``k`` only (the embedding's tables are not trained)."""
    ops = build.ops_for(q, k, cos, sin)
    if ops is None or cos.requires_grad or sin.requires_grad:
        return fallback(q, k, cos, sin, unsqueeze_dim=1)
    return _Rotary.apply(q, cos, sin, ops), _Rotary.apply(k, cos, sin, ops)
