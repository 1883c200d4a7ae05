"""LoRA linear layers as one autograd function: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: besides the products, every layer makes two
[tokens, out] temporaries in the forward pass (the scaled product and the sum) and two more in the backward
pass (the scaled gradient and the sum of the two input gradients), and each is read and written again. On a
2-core CPU with a few GB/s of memory bandwidth those element-wise passes were ~15 % of a LoRA update. Here the
adapter's product is added onto the base output in place (``addmm_``), the scaling is applied to the
[tokens, r] intermediate only, and the backward pass adds the adapter's input gradient onto the base one in
place. The products are the same ones, and dropout draws the same mask; results agree with peft's to fp32
rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch.nn import functional as F

from incentive.models.onednn import OneDNNLinear, matmul, onednn_linear


def fuse_lora(model: torch.nn.Module) -> int:
    """Switch every peft ``lora.Linear`` of ``model`` to :class:`FusedLoraLinear` in place (same parameters,
    state dict and peft behaviour); returns how many were switched."""
    switched = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            switched += 1
    return switched


class FusedLoraLinear(PeftLoraLinear):
    """A peft ``lora.Linear`` whose plain case (one active vanilla adapter without bias, adapters on and not
    merged) runs through :class:`_LoraLinearFunction`; every other case is peft's own."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        parts = self._plain_parts(x, args, kwargs)
        if parts is None:
            return super().forward(x, *args, **kwargs)
        base, dropout, lora_a, lora_b, scaling = parts
        onednn = isinstance(base, OneDNNLinear)
        return _LoraLinearFunction.apply(
            x, dropout(x), base.weight, base.bias, lora_a, lora_b, scaling, onednn
        )

    def _plain_parts(
        self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[torch.nn.Linear, torch.nn.Module, torch.Tensor, torch.Tensor, float] | None:
        """The base layer, the dropout, A, B and the scaling where the fused function computes what peft
        would."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        name = active[0]
        base = self.get_base_layer()
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        plain = (
            isinstance(base, torch.nn.Linear)
            and isinstance(lora_a, torch.nn.Linear)
            and isinstance(lora_b, torch.nn.Linear)
            and lora_a.bias is None
            and lora_b.bias is None
        )
        dtypes = {x.dtype, base.weight.dtype, lora_a.weight.dtype, lora_b.weight.dtype}
        if not plain or dtypes != {torch.float32}:
            return None
        return base, self.lora_dropout[name], lora_a.weight, lora_b.weight, float(self.scaling[name])


class _LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · (dropped Aᵀ) Bᵀ, where ``dropped`` is the adapter's input after dropout (``x``
    itself without dropout: then the adapter's input gradient is added onto the base one in place)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        dropped: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        onednn: bool,
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = onednn_linear(rows, weight, bias) if onednn else F.linear(rows, weight, bias)
        ctx.shared = dropped is x
        low = (dropped.reshape(-1, x.shape[-1]) @ lora_a.t()).mul_(scaling)
        out.addmm_(low, lora_b.t())
        ctx.save_for_backward(x, None if ctx.shared else dropped, weight, lora_a, lora_b, low)
        ctx.scaling = scaling
        ctx.onednn = onednn
        ctx.has_bias = bias is not None
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, dropped, weight, lora_a, lora_b, low = ctx.saved_tensors
        want_x, want_dropped, want_w, want_bias, want_a, want_b = ctx.needs_input_grad[:6]
        want_x = want_x or (ctx.shared and want_dropped)
        g = grad.reshape(-1, grad.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        adapter_rows = rows if ctx.shared else dropped.reshape(-1, x.shape[-1])
        dx = d_dropped = dw = dbias = da = db = None
        g_low = (g @ lora_b).mul_(ctx.scaling)
        if want_x:
            dx = matmul(g, weight) if ctx.onednn else g @ weight
            if ctx.shared:
                dx.addmm_(g_low, lora_a)
            dx = dx.reshape(x.shape)
        if want_dropped and not ctx.shared:
            d_dropped = (g_low @ lora_a).reshape(x.shape)
        if want_a:
            da = g_low.t() @ adapter_rows
        if want_b:
            db = g.t() @ low
        if want_w:
            dw = matmul(g.t(), rows) if ctx.onednn else g.t() @ rows
        if ctx.has_bias and want_bias:
            dbias = g.sum(0)
        return dx, d_dropped, dw, dbias, da, db, None, None
