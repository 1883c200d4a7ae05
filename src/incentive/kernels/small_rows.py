"""``x Wᵀ + b`` for the few rows of a decode step, through an AVX-512 kernel of ours (``small_rows.cpp``).

A decode step multiplies a few dozen rows by every weight of the model. MKL's fp32 GEMM packs each weight into
blocks before it multiplies, so at these row counts it reads the weights and then computes, one after the
other, far slower than one pass over the weights would take. The kernel reads each weight once, in its
``nn.Linear`` layout, prefetching ahead while it multiplies (measurements in docs/performance.md). Above
:func:`max_rows` rows the BLAS is faster again and takes over, as it does where the kernels are not built
(:mod:`incentive.kernels.build`).
Sums run in a fixed order, so results are deterministic and do not depend on the thread count; they agree with
``F.linear`` to fp32 rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from incentive.kernels import build
from incentive.models.onednn import onednn_preferred

MAX_ROWS_MKL = 64
"""Rows up to which the kernel beats MKL where MKL runs its own AVX-512 code (Intel CPUs): measured on a
2-core Sapphire Rapids as whole op-by-op decode steps, see docs/performance.md."""
MAX_ROWS_ONEDNN = 128
"""Rows up to which the kernel beats oneDNN (and MKL's AVX2 code) on the CPUs where the linear layers go through
oneDNN (AMD): measured on a 2-core EPYC, see docs/performance.md."""


def max_rows() -> int:
    """The most rows the kernel takes on this machine: where the BLAS the linear layers use by default
    (:func:`incentive.models.onednn.onednn_preferred`) overtakes it."""
    return MAX_ROWS_ONEDNN if onednn_preferred() else MAX_ROWS_MKL


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the kernel where :func:`linear_cat` would use it."""
    return linear_cat(x, [weight], [bias])


def applies(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`linear_cat` runs the kernel on ``x`` and ``weights``: it is built, the tensors are fp32
    CPU data and ``x`` has 1 to :func:`max_rows` rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 0 < rows <= max_rows() and build.ops_for(x, *weights) is not None


def linear_cat(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """``torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)``, as one kernel call (one pass
    over the weights, one parallel region) where :func:`applies`."""
    if not applies(x, weights):
        outs = [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)
    rows = x.numel() // x.shape[-1]
    out = build.kernel_ops().small_rows_linear(x.reshape(rows, x.shape[-1]), list(weights))
    if any(b is not None for b in biases):
        out.add_(
            torch.cat(
                [w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases, strict=True)]
            )
        )
    return out.view(*x.shape[:-1], out.shape[-1])
