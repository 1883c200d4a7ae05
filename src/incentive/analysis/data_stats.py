"""Token-length statistics of a distillation corpus: summary numbers of a length distribution, the span
histogram, the normalised entropy of that histogram and category/difficulty shares by instances or by tokens.

The paper this follows ("Not All Correct Answers Are Equal", a-m-team, 2025) compares teacher corpora by
count, total tokens, mean and median length, a span histogram (bins of 1024 tokens, 10240+ as overflow) and
category shares. It argues that a wider length spread is better without defining spread as a number; the
scalars in ``ADDED_STATS`` are this tool's additions to make it one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PAPER_STATS = ("count", "sum", "mean", "median")
"""Length statistics the paper reports."""
ADDED_STATS = (
    "std", "iqr", "q1", "q3", "p5", "p95", "min", "max", "cv", "share_short", "share_long", "bin_entropy",
)  # fmt: skip
"""Length statistics added by this tool: spread (population std, IQR, percentiles), the coefficient of
variation (std / mean), the tail masses P(len < bin width) and P(len >= cap), and the normalised entropy of
the span histogram (0: every row in one bin, 1: rows spread evenly over all bins)."""
NO_GROUP = "(none)"
"""The group of rows without a category (or difficulty)."""


@dataclass(frozen=True)
class Bins:
    """Span-histogram bins: ``[0, width)``, ``[width, 2*width)``, ... up to ``cap``, then one ``cap+`` bin."""

    width: int = 1024
    cap: int = 10240

    def __post_init__(self) -> None:
        if self.width < 1 or self.cap < self.width or self.cap % self.width:
            raise ValueError(
                f"bins need a width >= 1 and a cap that is a multiple of it; got width {self.width}, "
                f"cap {self.cap}"
            )

    @property
    def count(self) -> int:
        """Number of bins, the overflow bin included."""
        return self.cap // self.width + 1

    def labels(self) -> list[str]:
        """``[0,1024)``-style names of the bins, the last ``10240+``."""
        edges = range(0, self.cap, self.width)
        return [f"[{low},{low + self.width})" for low in edges] + [f"{self.cap}+"]

    def index(self, length: int) -> int:
        """The bin of a length."""
        return min(length // self.width, self.count - 1)


PAPER_BINS = Bins()
"""The paper's bins: 1024 tokens wide, 10240+ as overflow."""


def span_histogram(lengths: Sequence[int], bins: Bins = PAPER_BINS) -> list[int]:
    """Rows per bin; the counts add up to ``len(lengths)``."""
    counts = [0] * bins.count
    for length in lengths:
        counts[bins.index(length)] += 1
    return counts


def normalised_entropy(counts: Sequence[int]) -> float:
    """Shannon entropy of the histogram divided by log(number of bins): 0 when all mass is in one bin (or
    there is none), 1 when it is spread evenly."""
    total = sum(counts)
    if total == 0 or len(counts) < 2:
        return 0.0
    entropy = -sum(c / total * math.log(c / total) for c in counts if c)
    return max(0.0, entropy / math.log(len(counts)))


def length_stats(lengths: Sequence[int], bins: Bins = PAPER_BINS) -> dict[str, Any]:
    """The ``PAPER_STATS`` and ``ADDED_STATS`` of a list of token lengths (numpy's mean, median, population
    std and linearly interpolated percentiles); only count and sum for an empty list."""
    if not lengths:
        return {"count": 0, "sum": 0}
    values = np.asarray(lengths, dtype=np.float64)
    mean, std = float(values.mean()), float(values.std())
    p5, q1, median, q3, p95 = (float(v) for v in np.percentile(values, [5, 25, 50, 75, 95]))
    return {
        "count": len(lengths),
        "sum": int(sum(lengths)),
        "mean": mean,
        "median": median,
        "std": std,
        "iqr": q3 - q1,
        "q1": q1,
        "q3": q3,
        "p5": p5,
        "p95": p95,
        "min": int(min(lengths)),
        "max": int(max(lengths)),
        "cv": std / mean if mean > 0 else None,
        "share_short": float(np.mean(values < bins.width)),
        "share_long": float(np.mean(values >= bins.cap)),
        "bin_entropy": normalised_entropy(span_histogram(lengths, bins)),
    }


def group_order(keys: Sequence[str | None]) -> list[str]:
    """Group names by size, largest first; equal sizes keep the order of first appearance (a stable sort)."""
    counts: dict[str, int] = {}
    for key in keys:
        name = NO_GROUP if key is None else key
        counts[name] = counts.get(name, 0) + 1
    return sorted(counts, key=lambda name: -counts[name])


def grouped_length_stats(
    lengths: Sequence[int | None], groups: Sequence[str | None], bins: Bins = PAPER_BINS
) -> dict[str, Any]:
    """:func:`length_stats` over all rows and per group; a None length (the text is absent in that row) is
    left out and counted as ``missing``."""
    if len(lengths) != len(groups):
        raise ValueError(f"{len(lengths)} lengths but {len(groups)} groups")
    present = [length for length in lengths if length is not None]
    by_group = {}
    for name in group_order(groups):
        mine = [
            length
            for length, group in zip(lengths, groups, strict=True)
            if length is not None and (NO_GROUP if group is None else group) == name
        ]
        by_group[name] = length_stats(mine, bins)
    return {
        "all": length_stats(present, bins),
        "missing": len(lengths) - len(present),
        "by_group": by_group,
    }


def shares(
    keys: Sequence[str | None], weights: Sequence[float] | None = None
) -> dict[str, dict[str, float | None]]:
    """Per group: its rows (``instances``; ``weights`` None) or its summed weights (``tokens``) and its share
    of the total, largest first; shares add up to 1 (all None when the total is 0)."""
    order = group_order(keys)
    unit = "instances" if weights is None else "tokens"
    amounts: dict[str, float] = dict.fromkeys(order, 0)
    for index, key in enumerate(keys):
        amounts[NO_GROUP if key is None else key] += 1 if weights is None else weights[index]
    total = sum(amounts.values())
    if weights is not None:
        order = sorted(order, key=lambda name: -amounts[name])
    return {name: {unit: amounts[name], "share": amounts[name] / total if total else None} for name in order}
