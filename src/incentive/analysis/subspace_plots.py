"""PNG plots of the subspace analysis: mean MSO per pair against η (or k) with its random baseline, MSO by
layer, activation MSO per model, and the energy a projection keeps by layer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from incentive.analysis.subspace_select import layer_of


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def _axes(width: float = 7.5, height: float = 4.2) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height))
    return figure, figure.add_subplot()


def plot_levels(summary: Sequence[dict[str, Any]], path: Path) -> Path:
    """Mean weight-update MSO of each pair against η (solid), its random baseline (dashed, same colour); with
    a fixed k, one bar per pair and the baseline as a tick."""
    figure, ax = _axes()
    pairs = _by_pair(summary)
    fixed_k = summary[0]["k"] if summary else None
    if fixed_k is not None:
        names = list(pairs)
        ax.bar(names, [pairs[p][0]["mso_mean"] for p in names], color="tab:blue", label="MSO")
        randoms = [pairs[p][0]["mso_random_mean"] for p in names]
        ax.scatter(names, randoms, marker="_", s=600, c="k", label="random")
        ax.set_title(f"weight-update MSO, k = {fixed_k} (mean over tensors)")
        ax.tick_params(axis="x", labelrotation=20)
    else:
        for index, (pair, entries) in enumerate(pairs.items()):
            colour = f"C{index % 10}"
            etas = [e["eta"] for e in entries]
            ax.plot(etas, [e["mso_mean"] for e in entries], marker="o", color=colour, label=pair)
            ax.plot(etas, [e["mso_random_mean"] for e in entries], linestyle="--", color=colour, alpha=0.6)
        ax.set_xlabel("energy fraction η")
        ax.set_title("weight-update MSO (mean over tensors); dashed: random subspaces")
    ax.set_ylabel("MSO")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return _save(figure, path)


def _by_pair(entries: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    pairs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        pairs[f"{entry['a']} vs {entry['b']}"].append(entry)
    return dict(pairs)


def plot_layers(summary: Sequence[dict[str, Any]], level: dict[str, Any], path: Path) -> Path:
    """Mean MSO by decoder layer of each pair at one level (η or k)."""
    figure, ax = _axes()
    chosen = [s for s in summary if s["eta"] == level["eta"] and s["k"] == level["k"]]
    for entry in chosen:
        layers = sorted(entry["by_layer"], key=int)
        label = f"{entry['a']} vs {entry['b']}"
        ax.plot([int(x) for x in layers], [entry["by_layer"][x] for x in layers], marker="o", label=label)
    what = f"η = {level['eta']:g}" if level["eta"] is not None else f"k = {level['k']}"
    ax.set_title(f"weight-update MSO by layer, {what}")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("MSO")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_activations(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Activation MSO of the two prompt sets against η for each model (mean over layers), dashed: random."""
    figure, ax = _axes()
    by_model: dict[str, dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_model[row["model"]][row["eta"]].append((row["mso"], row["mso_random"]))
    for index, (model, levels) in enumerate(by_model.items()):
        colour = f"C{index % 10}"
        etas = sorted(levels)
        means = [sum(v for v, _ in levels[e]) / len(levels[e]) for e in etas]
        randoms = [sum(r for _, r in levels[e]) / len(levels[e]) for e in etas]
        ax.plot(etas, means, marker="o", color=colour, label=model)
        ax.plot(etas, randoms, linestyle="--", color=colour, alpha=0.6)
    ax.set_title("activation MSO of prompt sets A and B (mean over layers); dashed: random")
    ax.set_xlabel("energy fraction η")
    ax.set_ylabel("MSO")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_projection(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Share of each fine-tune's update energy the projection keeps, by decoder layer (non-layer tensors as
    -1)."""
    figure, ax = _axes()
    for label, result in results.items():
        kept: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for tensor in result["tensors"]:
            if tensor["energy_kept"] is None:
                continue
            layer = layer_of(tensor["tensor"])
            bucket = kept[-1 if layer is None else layer]
            bucket[0] += tensor["energy_kept"] * tensor["task_energy"]
            bucket[1] += tensor["task_energy"]
        layers = sorted(kept)
        ax.plot(layers, [kept[x][0] / kept[x][1] for x in layers], marker="o", label=label)
    plan = next(iter(results.values()))["plan"]
    ax.set_title(f"energy kept by layer: {plan['mode']}, {plan['basis']} (-1: embeddings, head, final norm)")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Σ‖P‖² / Σ‖U‖²")
    ax.legend(fontsize=8)
    return _save(figure, path)
