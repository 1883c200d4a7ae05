"""Compiling and loading the kernels of this package (``*.cpp`` here, one library, ops under
``torch.ops.incentive_kernels``).

They are compiled with the system's C++ compiler and ninja on first use (~30 s, once per machine, source and
torch version) into the incentive cache. Where that cannot happen (no AVX-512, no compiler or ninja, not Linux
on x86-64), or with ``INCENTIVE_KERNELS=0``, :func:`kernel_ops` is None and every caller takes its PyTorch path
instead. A compile that fails where it could run is logged as a warning (and fails the kernel tests).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from incentive.paths import cache_dir

log = logging.getLogger(__name__)

FOLDER = Path(__file__).parent
SOURCES = tuple(
    FOLDER / name
    for name in (
        "small_rows.cpp",
        "decode_attention.cpp",
        "swiglu.cpp",
        "log_softmax.cpp",
        "decode_layer.cpp",
        "rms_norm.cpp",
        "sampling.cpp",
        "rotary.cpp",
    )
)
HEADERS = (FOLDER / "vector_math.h", FOLDER / "kernels.h")


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built here, or None where they can be tried."""
    if os.environ.get("INCENTIVE_KERNELS", "1") == "0":
        return "INCENTIVE_KERNELS=0"
    if not sys.platform.startswith("linux") or platform.machine() not in {"x86_64", "AMD64"}:
        return f"built for Linux on x86-64 only (this is {sys.platform} on {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return f"the CPU has no AVX-512 (torch reports {capability})"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH (set CXX or install g++)"
    if shutil.which("ninja") is None:
        return "no ninja on PATH, which torch builds extensions with (apt-get install ninja-build)"
    return None


@functools.cache
def kernel_ops() -> Any | None:
    """``torch.ops.incentive_kernels`` with the ops built, or None (the reason logged once)."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("incentive kernels off, PyTorch ops instead: %s", reason)
        return None
    try:
        return _build()
    except Exception as exc:  # a failed compile must not stop sampling: the PyTorch path still works
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        log.warning("incentive kernels off, PyTorch ops instead: compiling %s failed: %s", FOLDER, lines[-1])
        return None


def _build() -> Any:
    """Compile (or reuse the cached build) and load the library. A second build loaded into the same process
    would register its ops twice, which aborts, so ops already loaded are returned as they are."""
    from torch.utils.cpp_extension import load

    if hasattr(torch.ops.incentive_kernels, "small_rows_linear"):
        return torch.ops.incentive_kernels
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + torch.__version__.encode())
    tag = digest.hexdigest()[:12]
    folder = cache_dir() / "kernels" / tag
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob("*.so")):
        log.info("compiling the incentive kernels into %s (once per machine, ~30 s)", folder)
    load(
        name=f"incentive_kernels_{tag}",
        sources=[str(s) for s in SOURCES],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.incentive_kernels


def ops_for(*tensors: torch.Tensor) -> Any | None:
    """The kernel ops where they are built and every tensor is fp32 on the CPU (what they compute), else None."""
    ops = kernel_ops()
    if ops is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    return ops
