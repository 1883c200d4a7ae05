"""The projection experiment: a fine-tune's update U = W_F − W_A projected onto, against, or away from the
top-k left singular directions L_k of the alignment update V = W_A − W_B (or, as controls, k of V's directions
drawn at random, or a uniformly random k-dimensional subspace), with the energy and cosine diagnostics."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from incentive.analysis.subspace_errors import SubspaceError
from incentive.analysis.subspace_linalg import (
    Spectrum,
    as_matrix,
    haar_basis,
    rounding_floor,
    spectrum,
    stable_seed,
)
from incentive.analysis.subspace_select import layer_of

MODES = ("onto", "away", "opposite")
"""onto: W_A + U_∥ (the paper's parallel ``same``); away: W_A + (U − U_∥) (orthogonal removal, ``orth``);
opposite: W_A − U_∥ (``opp``)."""
BASES = ("topk", "randomk", "random")


@dataclass(frozen=True)
class ProjectionPlan:
    """How to project: ``mode``, the directions (``basis``), their count per matrix (``k``, or ``frac`` of
    min(m, n) rounded, at least 1), the SVD of V and the seed of the random controls."""

    mode: str
    basis: str = "topk"
    k: int | None = None
    frac: float | None = None
    svd: str = "full"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SubspaceError(f"projection mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.basis not in BASES:
            raise SubspaceError(f"projection basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        if (self.k is None) == (self.frac is None):
            raise SubspaceError("a projection needs exactly one of --k and --frac")
        if self.k is not None and self.k < 1:
            raise SubspaceError(f"--k must be at least 1, got {self.k}")
        if self.frac is not None and not 0 < self.frac < 1:
            raise SubspaceError(f"--frac must lie in (0, 1), got {self.frac}")

    def k_for(self, m: int, n: int) -> int:
        """The directions asked of an m × n matrix: ``k``, or ``frac`` of min(m, n) rounded, at least 1."""
        if self.k is not None:
            return self.k
        assert self.frac is not None, "a plan has k or frac"
        return max(1, round(self.frac * min(m, n)))

    def describe(self) -> dict[str, Any]:
        """The plan as the output JSON records it."""
        return {
            "mode": self.mode,
            "basis": self.basis,
            "k": self.k,
            "frac": self.frac,
            "svd": self.svd,
            "seed": self.seed,
        }


def vector_parallel(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The part of ``u`` along the single direction of ``v``: (⟨u, v⟩ / ⟨v, v⟩)·v, zero where v is zero."""
    vv = float(np.vdot(v, v))
    return np.zeros_like(u) if vv == 0.0 else (float(np.vdot(u, v)) / vv) * v


def directions(
    v: np.ndarray,
    plan: ProjectionPlan,
    name: str,
    noise: float = 0.0,
    cache: dict[str, Spectrum] | None = None,
) -> np.ndarray:
    """The orthonormal directions (m × k) of matrix ``v`` that ``plan`` projects on; empty (m × 0) for a V
    that is zero or within the rounding ``noise`` of the weights it comes from. With a ``cache`` (tensor name
    → full SVD of its V, kept across plans) each V is decomposed once."""
    m, n = v.shape
    k = plan.k_for(m, n)
    if k > min(m, n):
        raise SubspaceError(
            f"--k {k} exceeds min(rows, columns) = {min(m, n)} of {name} ({m} x {n}); use a smaller --k, "
            "--frac, or leave the tensor out with --tensors / --layers"
        )
    if cache is not None:
        spec = cache.get(name) or cache.setdefault(name, spectrum(v, "full", floor=noise))
    else:
        svd = "full" if plan.basis == "randomk" else plan.svd
        spec = spectrum(v, svd, stable_seed(plan.seed, "svd", name), q=k, floor=noise)
    rank = spec.rank
    if rank == 0:
        return np.zeros((m, 0))
    if k > rank:
        if plan.k is not None:
            raise SubspaceError(
                f"--k {k} exceeds the rank {rank} of the alignment update of {name} ({m} x {n}; singular "
                "values within the weights' rounding noise do not count): its extra directions would be "
                "arbitrary; use a smaller --k or --frac"
            )
        k = rank
    rng = np.random.default_rng(stable_seed(plan.seed, plan.basis, name))
    if plan.basis == "topk":
        return spec.u[:, :k]
    if plan.basis == "randomk":
        return spec.u[:, np.sort(rng.choice(rank, size=k, replace=False))]
    return haar_basis(m, k, rng)


def parallel_part(
    u: np.ndarray,
    v: np.ndarray,
    plan: ProjectionPlan,
    name: str,
    noise: float = 0.0,
    cache: dict[str, Spectrum] | None = None,
) -> tuple[np.ndarray, int | None]:
    """U_∥: ``u`` projected on ``plan``'s directions of ``v`` (a vector: on v itself), and the k used (None
    for a vector)."""
    if u.ndim <= 1:
        return vector_parallel(u, v), None
    basis = directions(as_matrix(v), plan, name, noise, cache)
    parallel = basis @ (basis.T @ as_matrix(u))
    return parallel.reshape(u.shape), basis.shape[1]


def applied_update(u: np.ndarray, parallel: np.ndarray, mode: str) -> np.ndarray:
    """P, the update applied to W_A: U_∥ (onto), U − U_∥ (away), −U_∥ (opposite)."""
    if mode == "onto":
        return parallel
    if mode == "away":
        return u - parallel
    return -parallel


@dataclass
class Diagnostics:
    """Energy kept Σ‖P‖²/Σ‖U‖², cos(U, P) and cos(U, V) over all projected tensors, the energy removed
    ‖U − P‖² by layer (non-layer tensors by name), and each tensor's own figures."""

    uu: float = 0.0
    pp: float = 0.0
    up: float = 0.0
    uv: float = 0.0
    vv: float = 0.0
    removed: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tensors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, u: np.ndarray, v: np.ndarray, p: np.ndarray, k: int | None) -> None:
        """Count one tensor's update ``u``, alignment update ``v`` and applied update ``p``."""
        uu, pp, up, uv, vv = (float(np.vdot(x, y)) for x, y in ((u, u), (p, p), (u, p), (u, v), (v, v)))
        removed = float(np.sum((u - p) ** 2))
        self.uu += uu
        self.pp += pp
        self.up += up
        self.uv += uv
        self.vv += vv
        layer = layer_of(name)
        self.removed[f"layer {layer}" if layer is not None else name] += removed
        self.tensors.append(
            {
                "tensor": name,
                "shape": list(u.shape),
                "k": k,
                "task_energy": uu,
                "energy_kept": _ratio(pp, uu),
                "cos_task_proj": _cosine(up, uu, pp),
                "cos_task_align": _cosine(uv, uu, vv),
                "removed_energy": removed,
            }
        )

    def summary(self) -> dict[str, Any]:
        """The totals over all projected tensors."""
        return {
            "tensors_projected": len(self.tensors),
            "energy_kept": _ratio(self.pp, self.uu),
            "cos_task_proj": _cosine(self.up, self.uu, self.pp),
            "cos_task_align": _cosine(self.uv, self.uu, self.vv),
            "task_energy": self.uu,
            "removed_energy_by_part": dict(self.removed),
        }


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _cosine(dot: float, aa: float, bb: float) -> float | None:
    """⟨a, b⟩ / (‖a‖‖b‖), None where either is zero."""
    return dot / math.sqrt(aa * bb) if aa > 0 and bb > 0 else None


def project_tensor(
    name: str,
    w_base: np.ndarray,
    w_aligned: np.ndarray,
    w_tuned: np.ndarray,
    plan: ProjectionPlan,
    diagnostics: Diagnostics,
    eps: float = 0.0,
    cache: dict[str, Spectrum] | None = None,
) -> np.ndarray:
    """The projected weight W_A + P of one tensor, counted in ``diagnostics``; ``eps``: the machine epsilon of
    the stored weights (0 for exact ones), whose rounding noise in V does not count towards its rank;
    ``cache`` as in :func:`directions`."""
    u = w_tuned - w_aligned
    v = w_aligned - w_base
    noise = rounding_floor(eps, float(np.linalg.norm(w_aligned)), float(np.linalg.norm(w_base)))
    parallel, k = parallel_part(u, v, plan, name, noise, cache)
    p = applied_update(u, parallel, plan.mode)
    diagnostics.add(name, u, v, p, k)
    return w_aligned + p


def project_update(
    sd_base: dict[str, np.ndarray],
    sd_aligned: dict[str, np.ndarray],
    sd_tuned: dict[str, np.ndarray],
    plan: ProjectionPlan,
    selected: set[str] | None = None,
    cache: dict[str, Spectrum] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every tensor of ``sd_tuned`` with the ``selected`` ones (default: all) projected by ``plan``, the
    others as fine-tuned; and the diagnostics (``cache`` as in :func:`directions`)."""
    diagnostics = Diagnostics()
    out = {}
    for name, tuned in sd_tuned.items():
        if selected is not None and name not in selected:
            out[name] = tuned
            continue
        weights = (sd_base[name], sd_aligned[name], tuned)
        out[name] = project_tensor(name, *weights, plan, diagnostics, cache=cache)
    return out, {"plan": plan.describe(), **diagnostics.summary(), "tensors": diagnostics.tensors}
