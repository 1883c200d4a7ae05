"""The subspace analysis as text: the mean overlaps of each pair of updates (or each model's prompt sets) at a
few levels, against the random-subspace baseline, for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def levels_of(summary: Sequence[dict[str, Any]]) -> list[tuple[float | None, int | None]]:
    """The (η, k) levels of a summary, in order."""
    return list(dict.fromkeys((s["eta"], s["k"]) for s in summary))


SHOWN_LEVELS = 5
"""Levels the printed table shows at most (spread over the grid; the JSON has all)."""


def spread(levels: list[Any]) -> list[Any]:
    """At most SHOWN_LEVELS of ``levels``, evenly spread, first and last included."""
    if len(levels) <= SHOWN_LEVELS:
        return levels
    step = (len(levels) - 1) / (SHOWN_LEVELS - 1)
    return [levels[int(i * step + 0.5)] for i in range(SHOWN_LEVELS)]


def summary_lines(overlap: dict[str, Any]) -> list[str]:
    """The mean MSO of each pair against its random baseline at up to SHOWN_LEVELS levels, as a text table."""
    summary = overlap["summary"]
    if not summary:
        return ["no overlap measured (every selected update is zero)"]
    levels = spread(levels_of(summary))
    pairs = list(dict.fromkeys(f"{s['a']} vs {s['b']}" for s in summary))
    heads = [f"η={eta:g}" if eta is not None else f"k={k}" for eta, k in levels]
    cells = {
        (f"{s['a']} vs {s['b']}", (s["eta"], s["k"])): (s["mso_mean"], s["mso_random_mean"]) for s in summary
    }
    title = "weight-update MSO, mean over the selected tensors [random-subspace baseline]:"
    return _table(title, pairs, levels, heads, cells)


def activation_lines(activations: dict[str, Any]) -> list[str]:
    """The activation MSO of each model (mean over layers) against its baseline at up to SHOWN_LEVELS η."""
    sums: dict[tuple[str, float], list[float]] = {}
    for row in activations["rows"]:
        totals = sums.setdefault((row["model"], row["eta"]), [0.0, 0.0, 0.0])
        totals[0] += row["mso"]
        totals[1] += row["mso_random"]
        totals[2] += 1
    if not sums:
        return ["no activation overlap measured"]
    models = list(dict.fromkeys(m for m, _ in sums))
    etas = spread(sorted({e for _, e in sums}))
    cells = {(m, e): (t[0] / t[2], t[1] / t[2]) for (m, e), t in sums.items()}
    title = "activation MSO of PROMPTS_A vs PROMPTS_B, mean over layers [random-subspace baseline]:"
    return _table(title, models, etas, [f"η={e:g}" for e in etas], cells)


def _table(
    title: str, rows: Sequence[str], columns: Sequence[Any], heads: Sequence[str], cells: dict[Any, Any]
) -> list[str]:
    """A text table of (value, baseline) cells keyed by (row, column)."""
    width = max(len(r) for r in rows) + 2
    lines = [title, "".ljust(width) + "".join(h.rjust(16) for h in heads)]
    for name in rows:
        line = name.ljust(width)
        for column in columns:
            cell = cells.get((name, column))
            line += (f"{cell[0]:.3f} [{cell[1]:.3f}]" if cell else "-").rjust(16)
        lines.append(line)
    return lines
