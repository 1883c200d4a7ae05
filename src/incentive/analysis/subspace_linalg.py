"""The linear algebra of subspace overlap, in float64 numpy: principal directions of a matrix (by energy
fraction or a fixed count), Mode Subspace Overlap between two orthonormal bases, and the overlap expected of
random subspaces of the same dimensions, analytic and sampled."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from incentive.analysis.subspace_errors import SubspaceError

FULL_SVD_MAX_DIM = 10_000
"""``svd="auto"``: a full SVD up to this many rows or columns, a randomized one beyond."""
LOWRANK_SHARE = 0.25
"""A randomized SVD keeps q = floor(LOWRANK_SHARE * min(m, n)) directions."""
RANK_RTOL = 1e-10
"""Singular values below RANK_RTOL * the largest count as zero (the numerical rank)."""


@dataclass(frozen=True)
class Spectrum:
    """Left singular vectors (columns of ``u``, in the matrix's row space R^m) and singular values,
    descending; ``captured`` is the share of the matrix's squared Frobenius norm the kept values hold (1 for a
    full SVD); ``floor``: singular values up to it are rounding noise (see :func:`rounding_floor`)."""

    u: np.ndarray
    s: np.ndarray
    method: str
    captured: float
    floor: float = 0.0

    @property
    def dim(self) -> int:
        """The ambient dimension d of the directions (the matrix's row count)."""
        return int(self.u.shape[0])

    @property
    def rank(self) -> int:
        """How many singular values are not zero: above RANK_RTOL times the largest and above ``floor``."""
        return numerical_rank(self.s, self.floor)


def as_matrix(array: np.ndarray) -> np.ndarray:
    """The 2-D view an update is analysed as: a vector (n,) → (n, 1), a matrix unchanged, a higher-order
    tensor (e.g. a convolution kernel) → (out, -1)."""
    if array.ndim == 0:
        raise ValueError("a scalar has no subspace")
    if array.ndim == 1:
        return array.reshape(-1, 1)
    return array.reshape(array.shape[0], -1)


def numerical_rank(s: np.ndarray, floor: float = 0.0) -> int:
    """How many of the descending singular values ``s`` exceed both RANK_RTOL times the largest and ``floor``
    (0 for a zero matrix)."""
    if s.size == 0 or s[0] <= 0:
        return 0
    return int(np.count_nonzero(s > max(s[0] * RANK_RTOL, floor)))


def rounding_floor(eps: float, *norms: float) -> float:
    """The most that rounding weights to a precision of machine epsilon ``eps`` can move a singular value of
    their difference: each weight W is off by at most eps/2 · |W| per entry, so by Weyl's inequality the
    difference's singular values move by at most eps/2 · Σ‖W‖_F; twice that, for a margin."""
    return eps * sum(norms)


def stable_seed(seed: int, *names: str) -> int:
    """A seed for one named draw (a tensor, a layer) that does not depend on which others are drawn or in what
    order: ``seed`` mixed with a CRC of the names."""
    return (seed * 1_000_003 + zlib.crc32("\x1f".join(names).encode())) % 2**32


def spectrum(
    matrix: np.ndarray, svd: str = "auto", seed: int = 0, q: int | None = None, floor: float = 0.0
) -> Spectrum:
    """The SVD of ``matrix`` in float64: ``full``, ``lowrank`` (randomized, q directions, two power
    iterations, drawn from ``seed``) or ``auto`` (full unless a side exceeds FULL_SVD_MAX_DIM); ``floor`` as
    in Spectrum."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"spectrum needs a 2-D matrix, got shape {m.shape}")
    if svd not in ("auto", "full", "lowrank"):
        raise ValueError(f"svd must be auto, full or lowrank, got {svd!r}")
    lowrank = svd == "lowrank" or (svd == "auto" and max(m.shape) > FULL_SVD_MAX_DIM)
    if not lowrank or min(m.shape) <= 1:
        u, s, _ = np.linalg.svd(m, full_matrices=False)
        return Spectrum(u, s, "full", 1.0, floor)
    q = q or max(1, math.floor(LOWRANK_SHARE * min(m.shape)))
    u, s = _randomized_svd(m, q, seed)
    total = float(np.sum(m * m))
    captured = float(np.sum(s * s)) / total if total > 0 else 1.0
    return Spectrum(u, s, "lowrank", min(captured, 1.0), floor)


def _randomized_svd(
    m: np.ndarray, q: int, seed: int, niter: int = 2, oversample: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``q`` left singular vectors and values of ``m`` by a seeded randomized range finder (Halko et
    al.): a Gaussian sketch, ``niter`` re-orthonormalized power iterations, then an exact SVD of the
    projection."""
    rng = np.random.default_rng(seed)
    width = min(q + oversample, min(m.shape))
    basis, _ = np.linalg.qr(m @ rng.standard_normal((m.shape[1], width)))
    for _ in range(niter):
        basis, _ = np.linalg.qr(m.T @ basis)
        basis, _ = np.linalg.qr(m @ basis)
    small_u, s, _ = np.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ small_u)[:, :q], s[:q]


def energy_k(s: np.ndarray, eta: float) -> int:
    """The fewest leading directions whose squared singular values hold at least ``eta`` of the total (of the
    values given: for a randomized SVD, of the captured energy); 0 for a zero matrix."""
    if not 0 < eta <= 1:
        raise ValueError(f"an energy fraction must lie in (0, 1], got {eta}")
    energy = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    if energy.size == 0 or energy[-1] <= 0:
        return 0
    target = eta * energy[-1] * (1 - 1e-12)
    return int(np.searchsorted(energy, target, side="left")) + 1


def energy_basis(matrix: np.ndarray, eta: float, svd: str = "auto", seed: int = 0) -> tuple[np.ndarray, int]:
    """The orthonormal basis (d × k) of the fewest principal directions of ``matrix`` that hold ``eta`` of its
    energy, and k."""
    spec = spectrum(as_matrix(np.asarray(matrix, dtype=np.float64)), svd, seed)
    k = energy_k(spec.s, eta)
    return spec.u[:, :k], k


def top_k(spec: Spectrum, k: int, what: str) -> np.ndarray:
    """The first ``k`` principal directions of ``spec``; refuses a k above the matrix's rank, whose extra
    directions would be arbitrary (``what`` names the matrix in the message)."""
    if k < 1:
        raise SubspaceError(f"k must be at least 1, got {k}")
    rank = spec.rank
    if k > rank:
        noise = " (singular values within the weights' rounding noise do not count)" if spec.floor else ""
        raise SubspaceError(
            f"k = {k} exceeds the rank {rank} of {what}{noise}; use a smaller k or an energy fraction"
        )
    return spec.u[:, :k]


def mso(q1: np.ndarray, q2: np.ndarray) -> float:
    """Mode Subspace Overlap ‖Q1ᵀ Q2‖_F² / min(k1, k2) of two orthonormal bases of the same space: 1 when the
    smaller subspace lies in the larger, 0 when they are orthogonal."""
    if q1.ndim != 2 or q2.ndim != 2 or q1.shape[0] != q2.shape[0]:
        raise ValueError(f"bases must be d x k matrices of one d, got {q1.shape} and {q2.shape}")
    k = min(q1.shape[1], q2.shape[1])
    if k == 0:
        raise ValueError("an empty basis has no overlap")
    cross = np.asarray(q1, dtype=np.float64).T @ np.asarray(q2, dtype=np.float64)
    return float(np.sum(cross * cross)) / k


def mso_random(k1: int, k2: int, d: int) -> float:
    """The expected MSO of independent uniformly random (Haar) subspaces of dimensions k1 and k2 in R^d:
    E‖Q1ᵀ Q2‖_F² = k1·k2/d, so the MSO expectation is max(k1, k2)/d."""
    if not (1 <= k1 <= d and 1 <= k2 <= d):
        raise ValueError(f"need 1 <= k1, k2 <= d, got k1={k1}, k2={k2}, d={d}")
    return max(k1, k2) / d


def haar_basis(d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """An orthonormal basis (d × k) of a uniformly random k-dimensional subspace of R^d (QR of a Gaussian
    matrix; the subspace, not the basis, is what is uniform)."""
    basis, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return basis


def mso_random_sampled(k1: int, k2: int, d: int, samples: int, seed: int) -> tuple[float, float]:
    """Monte-Carlo mean of the MSO of random k1- and k2-dimensional subspaces of R^d, and its standard error.
    By rotation invariance one subspace can stay fixed (the first k2 axes): each sample draws one basis."""
    if samples < 2:
        raise ValueError(f"need at least 2 samples for a standard error, got {samples}")
    mso_random(k1, k2, d)
    rng = np.random.default_rng(seed)
    values = np.empty(samples)
    for i in range(samples):
        rows = haar_basis(d, k1, rng)[:k2]
        values[i] = float(np.sum(rows * rows)) / min(k1, k2)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(samples))
