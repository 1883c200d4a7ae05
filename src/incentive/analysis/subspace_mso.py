"""Weight-update Mode Subspace Overlap: for each group of tensors, the principal directions of every update
(by energy fraction η or a fixed k), the MSO of every pair of updates and the random-subspace baseline, then
means over groups by pair and level, by kind of tensor and by layer."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from incentive.analysis.subspace_linalg import (
    LOWRANK_SHARE,
    Spectrum,
    as_matrix,
    energy_k,
    mso,
    mso_random,
    mso_random_sampled,
    spectrum,
    stable_seed,
    top_k,
)
from incentive.analysis.subspace_select import Group

ETAS = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
"""The default energy fractions of the weight-update overlaps."""


@dataclass(frozen=True)
class MsoSettings:
    """How subspaces are chosen: energy fractions ``etas``, or ``k`` directions each (then ``etas`` is
    ignored); the SVD (auto, full, lowrank); Monte-Carlo baseline samples per (k1, k2, d) (0: the analytic one
    only)."""

    etas: tuple[float, ...] = ETAS
    k: int | None = None
    svd: str = "auto"
    random_samples: int = 0
    seed: int = 0

    def levels(self) -> list[tuple[float | None, int | None]]:
        """(η, fixed k) of each level measured."""
        return [(None, self.k)] if self.k is not None else [(eta, None) for eta in self.etas]


@dataclass(frozen=True)
class Update:
    """One group's update as a stacked 2-D matrix, and the rounding noise of the weights it was taken from
    (singular values up to ``noise`` do not count towards its rank; 0 for exact values)."""

    matrix: np.ndarray
    noise: float = 0.0


class SampledBaseline:
    """Monte-Carlo baselines cached by dimensions, each drawn from a seed of its own (reproducible in any
    order)."""

    def __init__(self, samples: int, seed: int) -> None:
        self.samples = samples
        self.seed = seed
        self._cache: dict[tuple[int, int, int], tuple[float, float]] = {}

    def __call__(self, k1: int, k2: int, d: int) -> tuple[float, float]:
        key = (min(k1, k2), max(k1, k2), d)
        if key not in self._cache:
            seed = stable_seed(self.seed, "baseline", *map(str, key))
            self._cache[key] = mso_random_sampled(key[1], key[0], d, self.samples, seed)
        return self._cache[key]


def stacked_matrix(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The 2-D views of a group's updates, stacked by rows (one tensor: its own 2-D view)."""
    return np.concatenate([as_matrix(a) for a in arrays], axis=0)


def group_mso(
    group: Group,
    updates: Mapping[str, Update],
    settings: MsoSettings,
    baseline: SampledBaseline | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Overlap rows of every pair of ``updates`` (label → the group's update), the spectra's summaries, and
    the updates left out: zero, or no larger than the rounding noise of the weights."""
    spectra: dict[str, Spectrum] = {}
    info: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for label, update in updates.items():
        matrix = update.matrix
        norm = float(np.linalg.norm(matrix))
        if norm == 0.0:
            skipped.append({"group": group.name, "update": label, "reason": "zero update"})
            continue
        q = max(math.floor(LOWRANK_SHARE * min(matrix.shape)), settings.k or 0) or None
        seed = stable_seed(settings.seed, group.name, label)
        spec = spectrum(matrix, settings.svd, seed, q, update.noise)
        info.append(
            {
                "group": group.name,
                "update": label,
                "shape": list(matrix.shape),
                "norm": norm,
                "rank": spec.rank,
                "rounding_noise": update.noise,
                "svd": spec.method,
                "captured_energy": spec.captured,
            }
        )
        if spec.rank == 0:
            skipped.append({"group": group.name, "update": label, "reason": "within rounding noise"})
            continue
        spectra[label] = spec
    rows: list[dict[str, Any]] = []
    shapes = {label: list(update.matrix.shape) for label, update in updates.items()}
    for eta, k in settings.levels():
        bases = {
            label: _basis(spec, eta, k, f"the {label} update of {group.name} {shapes[label]}")
            for label, spec in spectra.items()
        }
        for a, b in itertools.combinations(bases, 2):
            rows.append(_row(group, a, b, bases[a], bases[b], eta, k, baseline))
    return rows, info, skipped


def _basis(spec: Spectrum, eta: float | None, k: int | None, what: str) -> np.ndarray:
    if k is not None:
        return top_k(spec, k, what)
    assert eta is not None, "a level has an energy fraction or a fixed k"
    return spec.u[:, : energy_k(spec.s, eta)]


def _row(
    group: Group,
    a: str,
    b: str,
    qa: np.ndarray,
    qb: np.ndarray,
    eta: float | None,
    k: int | None,
    baseline: SampledBaseline | None,
) -> dict[str, Any]:
    d = qa.shape[0]
    value = mso(qa, qb)
    random = mso_random(qa.shape[1], qb.shape[1], d)
    row: dict[str, Any] = {
        "group": group.name,
        "layer": group.layer,
        "module": group.module,
        "a": a,
        "b": b,
        "eta": eta,
        "k": k,
        "k_a": qa.shape[1],
        "k_b": qb.shape[1],
        "d": d,
        "mso": value,
        "mso_random": random,
        "ratio": value / random,
    }
    if baseline is not None:
        row["mso_random_sampled"], row["mso_random_se"] = baseline(qa.shape[1], qb.shape[1], d)
    return row


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means over groups for each pair and level: MSO, the random baseline, the ratio of the two means (and
    the median of the groups' own ratios), and the mean MSO by kind of tensor and by layer; pairs in the order
    first seen."""
    buckets: dict[tuple[str, str, float | None, int | None], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        buckets[(row["a"], row["b"], row["eta"], row["k"])].append(row)
    summary = []
    for (a, b, eta, k), members in buckets.items():
        by_module: dict[str, list[float]] = defaultdict(list)
        by_layer: dict[int, list[float]] = defaultdict(list)
        for row in members:
            by_module[row["module"]].append(row["mso"])
            if row["layer"] is not None:
                by_layer[row["layer"]].append(row["mso"])
        mean, random = _mean(r["mso"] for r in members), _mean(r["mso_random"] for r in members)
        summary.append(
            {
                "a": a,
                "b": b,
                "eta": eta,
                "k": k,
                "groups": len(members),
                "mso_mean": mean,
                "mso_random_mean": random,
                "ratio_of_means": mean / random,
                "ratio_median": float(np.median([r["ratio"] for r in members])),
                "by_module": {m: _mean(v) for m, v in sorted(by_module.items())},
                "by_layer": {str(layer): _mean(v) for layer, v in sorted(by_layer.items())},
            }
        )
    return summary


def _mean(values: Any) -> float:
    values = list(values)
    return float(sum(values) / len(values))


def in_memory(updates: Mapping[str, Mapping[str, np.ndarray]]) -> Callable[[Group], dict[str, Update]]:
    """A loader for :func:`update_mso` over exact updates held in memory (label → tensor name → update array).
    """
    return lambda group: {
        label: Update(stacked_matrix([tensors[name] for name in group.members]))
        for label, tensors in updates.items()
    }


def update_mso(
    groups: Sequence[Group], load: Callable[[Group], Mapping[str, Update]], settings: MsoSettings
) -> dict[str, Any]:
    """MSO over ``groups``, whose updates ``load`` gives one group at a time (label → :class:`Update`):
    rows per group, pair and level, the spectra, the zero updates left out, and the summary."""
    baseline = SampledBaseline(settings.random_samples, settings.seed) if settings.random_samples else None
    rows: list[dict[str, Any]] = []
    spectra: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for group in groups:
        group_rows, group_spectra, group_skipped = group_mso(group, load(group), settings, baseline)
        rows += group_rows
        spectra += group_spectra
        skipped += group_skipped
    return {"rows": rows, "spectra": spectra, "skipped": skipped, "summary": summarize(rows)}
