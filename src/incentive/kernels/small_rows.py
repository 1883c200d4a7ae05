"""``x Wᵀ + b`` for the few rows of a decode step, through an AVX-512 kernel of ours (``small_rows.cpp``).

A decode step multiplies 1-32 rows by every weight of the model. MKL's fp32 GEMM packs each weight into blocks
before it multiplies, so at these row counts it reads the weights and then computes, one after the other: on
a 2-core Xeon the linear layers of the embedded model take ~50 ms per step at 16 rows against ~20 ms for one
pass over their 424 MB. The kernel reads each weight once, in its ``nn.Linear`` layout, prefetching ahead while
it multiplies: ~37 ms at 16 rows, ~27 ms at 8 (see docs/performance.md). Above :data:`MAX_ROWS` rows MKL is
faster again and takes over.

The kernel is compiled with the system's C++ compiler on first use (~12 s, once per machine and torch version)
into the incentive cache. Where that cannot happen (no AVX-512, no compiler, not Linux on x86-64), or with
``INCENTIVE_KERNELS=0``, :func:`small_rows_op` is None and callers use ``F.linear``. Its sums run in a fixed
order, so results are deterministic and do not depend on the thread count; they agree with ``F.linear`` to
fp32 rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.nn import functional as F

from incentive.paths import cache_dir

log = logging.getLogger(__name__)

MAX_ROWS = 32
"""Up to this many rows the kernel beats MKL on a 2-core Xeon (16 rows: 37 vs 50 ms; 48 rows: 67-71 vs 65)."""

SOURCE = Path(__file__).with_name("small_rows.cpp")

Op = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built here, or None where it can be tried."""
    if os.environ.get("INCENTIVE_KERNELS", "1") == "0":
        return "INCENTIVE_KERNELS=0"
    if not sys.platform.startswith("linux") or platform.machine() not in {"x86_64", "AMD64"}:
        return f"built for Linux on x86-64 only (this is {sys.platform} on {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return f"the CPU has no AVX-512 (torch reports {capability})"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH (set CXX or install g++)"
    return None


@functools.cache
def small_rows_op() -> Op | None:
    """The compiled ``small_rows_linear(x [M, K], [W1 [N1, K], ...]) -> [M, N1 + ...]`` op, or None (reason
    logged once)."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("decode products run on F.linear: %s", reason)
        return None
    try:
        return _build()
    except Exception as exc:  # a failed compile must not stop sampling: F.linear still works
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        log.warning("decode products run on F.linear: compiling %s failed: %s", SOURCE, lines[-1])
        return None


def _build() -> Op:
    """Compile (or reuse the cached build) and load the op; a second load of another build into the same
    process would register the op twice, which aborts, so one already loaded is returned as it is."""
    from torch.utils.cpp_extension import load

    if hasattr(torch.ops.incentive_kernels, "small_rows_linear"):
        return torch.ops.incentive_kernels.small_rows_linear
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    folder = cache_dir() / "kernels" / f"small_rows-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    load(
        name=f"incentive_small_rows_{digest}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.incentive_kernels.small_rows_linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the kernel where :func:`linear_cat` would use it."""
    return linear_cat(x, [weight], [bias])


def linear_cat(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """``torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)``, as one kernel call (one pass
    over the weights, one parallel region) where the kernel is built and ``x`` has at most :data:`MAX_ROWS`
    rows of fp32 CPU data."""
    op = small_rows_op()
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if op is None or not 0 < rows <= MAX_ROWS or not all(_fp32_cpu(t) for t in (x, *weights)):
        outs = [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)
    out = op(x.reshape(rows, x.shape[-1]), list(weights))
    if any(b is not None for b in biases):
        out.add_(
            torch.cat(
                [w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases, strict=True)]
            )
        )
    return out.view(*x.shape[:-1], out.shape[-1])


def _fp32_cpu(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"
