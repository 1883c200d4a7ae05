"""Compiling and loading the kernels of this package (``*.cpp`` here, one library, ops under
``torch.ops.incentive_kernels``).

They are compiled with the system's C++ compiler and ninja on first use (once per machine, source and torch
installation) into the incentive cache. Where that cannot happen (no AVX-512, no compiler or ninja, not Linux
on x86-64), or with ``INCENTIVE_KERNELS=0``, :func:`kernel_ops` is None and every caller takes its PyTorch path
instead. A compile that fails where it could run is logged as a warning (and fails the kernel tests).

Processes that share the cache take turns through an OS lock on ``incentive.lock`` in the build folder, which
dies with its holder, so a compile killed half-way cannot leave the next one waiting forever on PyTorch's own
``lock`` file. A process waits for another's compile at most ``INCENTIVE_KERNEL_BUILD_WAIT_S`` seconds (default
300), saying so, and then takes the PyTorch path.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
WAIT_ENV = "INCENTIVE_KERNEL_BUILD_WAIT_S"
DEFAULT_WAIT_S = 300.0


class BuildLockTimeout(RuntimeError):
    """Another process held the build lock for longer than this one may wait."""


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
    except BuildLockTimeout as exc:
        log.warning("incentive kernels off, PyTorch ops instead: %s", exc)
        return None
    except Exception as exc:  # a failed compile must not stop sampling: the PyTorch path still works
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        log.warning("incentive kernels off, PyTorch ops instead: compiling %s failed: %s", FOLDER, lines[-1])
        return None


def _build() -> Any:
    """Compile (or reuse the cached build) and load the library. A second build loaded into the same process
    would register its ops twice, which aborts, so ops already loaded are returned as they are."""
    from torch.utils.cpp_extension import load

    if _loaded():
        return torch.ops.incentive_kernels
    folder = build_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with build_lock(folder, wait_limit()):
        if not any(folder.glob("*.so")):
            log.info("compiling the incentive kernels into %s (once per machine, ~30 s)", folder)
        load(
            name=f"incentive_kernels_{folder.name}",
            sources=[str(s) for s in staged_sources(folder)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    return torch.ops.incentive_kernels


def staged_sources(folder: Path) -> list[Path]:
    """The sources copied into the build folder (headers beside them), compiled from there: every checkout of the
    same sources then writes the same build file, where compiling each checkout's own paths would make them
    rebuild the shared library in turn."""
    staged = folder / "src"
    staged.mkdir(exist_ok=True)
    for source in SOURCES + HEADERS:
        copy = staged / source.name
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            tmp = staged / f".{source.name}.{os.getpid()}.tmp"
            shutil.copyfile(source, tmp)
            tmp.replace(copy)
    return [staged / source.name for source in SOURCES]


def build_folder() -> Path:
    """The cache folder of this build: one per source, torch version and torch installation (the build file
    names the installation's headers, so two environments sharing a folder would rebuild it in turn)."""
    torch_files = str(Path(torch.__file__).resolve().parent).encode()
    digest = hashlib.sha256(
        b"".join(s.read_bytes() for s in SOURCES + HEADERS) + torch.__version__.encode() + torch_files
    )
    return cache_dir() / "kernels" / digest.hexdigest()[:12]


def _loaded() -> bool:
    """Whether this process has registered the ops already (loading them a second time would abort)."""
    return hasattr(torch.ops.incentive_kernels, "small_rows_linear")


def wait_limit() -> float:
    """Seconds to wait for another process's compile, from ``INCENTIVE_KERNEL_BUILD_WAIT_S`` (a bad value is
    reported and the default used: a typo must not stop sampling)."""
    raw = os.environ.get(WAIT_ENV)
    if raw is None:
        return DEFAULT_WAIT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        log.warning(
            "%s=%r is not a number of seconds >= 0; waiting up to %g s", WAIT_ENV, raw, DEFAULT_WAIT_S
        )
        return DEFAULT_WAIT_S
    return seconds


@contextmanager
def build_lock(folder: Path, wait_s: float, poll_s: float = 0.2) -> Iterator[None]:
    """Hold the build folder's lock: an ``flock`` the OS drops when its holder dies, so it is never stale. While
    it is ours, a PyTorch ``lock`` file in the folder is ours or was left by a compile cut short, so it is removed
    on the way in and out (torch would wait on it forever). Waits at most ``wait_s``, saying who holds the lock,
    then raises BuildLockTimeout."""
    path = folder / "incentive.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = path.read_text().strip() or "another process"
                if time.monotonic() >= deadline:
                    raise BuildLockTimeout(
                        f"{holder} has been compiling the kernels in {folder} for longer than this process "
                        f"waits ({wait_s:g} s, {WAIT_ENV})"
                    ) from None
                if not waiting:
                    log.warning(
                        "waiting for %s, which is compiling the kernels in %s (at most %g s, %s)",
                        holder,
                        folder,
                        wait_s,
                        WAIT_ENV,
                    )
                    waiting = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        baton = folder / "lock"
        if baton.exists():
            log.warning("removing %s, left by a kernel compile that was killed", baton)
            baton.unlink(missing_ok=True)
        try:
            yield
        finally:
            baton.unlink(missing_ok=True)  # left by a load() cut short here (an exception, a stop signal)
    finally:
        os.close(fd)


def ops_for(*tensors: torch.Tensor) -> Any | None:
    """The kernel ops where they are built and every tensor is fp32 on the CPU (what they compute), else None."""
    ops = kernel_ops()
    if ops is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    return ops
