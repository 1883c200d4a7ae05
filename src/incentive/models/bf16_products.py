"""Matrix products in bf16 inside an fp32 model: mixed precision for the RL update (``model.update_products``).

Inside :func:`bf16_products`, the linear products that go through :func:`incentive.models.onednn.onednn_linear`
(every linear layer of a model loaded with oneDNN, and the fused LM head) take bf16 copies of their two inputs
and round their output to bf16, as ``torch.autocast`` computes a linear layer; everything else stays fp32: the
activations between products, norms, attention, the softmax, the gradients added to ``.grad`` and the
optimizer. A weight is rounded once per context (its bf16 copy is kept until :func:`weights_changed`), an
activation once per product. On CPUs with bf16 dot-product instructions (``avx512_bf16``) or units (AMX) oneDNN runs
these products at about twice its fp32 rate; elsewhere bf16 is emulated and slower than fp32, so a recipe
asking for it there is refused (:func:`require_bf16_products`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from incentive.cpu import CPUINFO, cpu_flags
from incentive.models import lean_saves

_weights: dict[tuple[int, torch.Size, tuple[int, ...], int], torch.Tensor] | None = None
"""Inside :func:`bf16_products`, the bf16 copies of the weights rounded so far; None outside it."""


def has_bf16_products(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU multiplies bf16 in hardware: the ``avx512_bf16`` or ``amx_bf16`` flag."""
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def require_bf16_products(cpuinfo: Path = CPUINFO) -> None:
    """Refuse bf16 update products on a CPU that would emulate them, before any model is loaded."""
    if not torch.backends.mkldnn.is_available():
        raise ValueError("model.update_products: bfloat16 runs through oneDNN, which this torch build lacks")
    if not has_bf16_products(cpuinfo):
        raise ValueError(
            "model.update_products: bfloat16 needs a CPU with bf16 instructions (flag avx512_bf16 or amx_bf16 "
            "in /proc/cpuinfo); on this CPU bf16 products are slower than fp32. Use update_products: float32"
        )


@contextlib.contextmanager
def bf16_products() -> Iterator[None]:
    """Linear products through :func:`incentive.models.onednn.onednn_linear` run in bf16 inside the block."""
    global _weights
    outer, _weights = _weights, {} if _weights is None else _weights
    try:
        yield
    finally:
        _weights = outer


def active() -> bool:
    """Whether this is inside :func:`bf16_products`."""
    return _weights is not None


def weights_changed() -> None:
    """Forget the weights' bf16 copies: call after an optimizer step inside :func:`bf16_products` (PyTorch's
    fused AdamW writes the weights without bumping their version counter, so a changed weight is not seen)."""
    if _weights is not None:
        _weights.clear()


def rounded(t: torch.Tensor) -> torch.Tensor:
    """``t`` in bf16, detached (strides kept, so a transposed view stays one); a weight (a parameter or a view of
    one) is rounded once until :func:`weights_changed` or an in-place write, an activation every time (and where
    the activation is one :mod:`incentive.models.lean_saves` remakes, so is its rounding)."""
    root = t if t._base is None else t._base
    if _weights is None or not isinstance(root, torch.nn.Parameter):
        return lean_saves.derived(_to_bf16(t), t, _to_bf16)
    key = (t.data_ptr(), t.shape, t.stride(), root._version)
    copy = _weights.get(key)
    if copy is None:
        copy = _weights[key] = t.detach().to(torch.bfloat16)
    return copy


def _to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.bfloat16)


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` through oneDNN for bf16 ``a`` and ``b`` (either may be a transposed view), in bf16."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`product` in fp32."""
    return product(a, b).float()


class Bf16Linear(torch.autograd.Function):
    """y = x Wᵀ + b with both products of x and W (forward, input gradient) and the weight gradient's in bf16;
    the bias and every result in fp32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xb, wb = rounded(x), rounded(weight)
        ctx.save_for_backward(xb, wb)
        ctx.has_bias = bias is not None
        y = _mm(xb.reshape(-1, x.shape[-1]), wb).reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y.add_(bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xb, wb = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        gb = rows.to(torch.bfloat16)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm(gb, wb.t()).reshape(xb.shape)
        if ctx.needs_input_grad[1]:
            dw = _mm(gb.t(), xb.reshape(-1, xb.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = rows.sum(0)
        return dx, dw, db


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with bf16 products and fp32 results (see the module doc)."""
    return Bf16Linear.apply(x, weight, bias)


def reference_bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`bf16_linear` computes, through PyTorch's bf16 ``F.linear`` and autograd: the yardstick."""
    y = torch.nn.functional.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16)).float()
    return y if bias is None else y + bias
