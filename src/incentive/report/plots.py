"""The report's PNG plots, one figure per topic, every run overlaid in its own colour (matplotlib, Agg backend).

A figure is drawn when some run holds its data (RL metrics, evals, SFT metrics); a panel with nothing to show
says so instead of staying blank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from incentive.report.loading import RunData, number, series

MARKERS_UP_TO = 30
"""Lines with at most this many points get markers (a one-step run still shows a dot)."""


@dataclass(frozen=True)
class Plot:
    """A written PNG and what it shows."""

    name: str
    title: str
    path: Path


def colour(index: int) -> str:
    """Run ``index``'s colour, the same in every figure."""
    return f"C{index % 10}"


def _figure(panels: int, title: str) -> tuple[Figure, list[Axes]]:
    """A grid of up to three panels a row."""
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(4.2 * cols, 3.3 * rows + 0.4), dpi=96, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return fig, axes


def _run_legend(fig: Figure, runs: list[RunData]) -> None:
    """Below a comparison's figure: the colour of each run drawn in it."""
    drawn = {label.split(": ")[0] for ax in fig.axes for label in ax.get_legend_handles_labels()[1]}
    handles = [
        Line2D([], [], color=colour(i), linewidth=2, label=run.label)
        for i, run in enumerate(runs)
        if run.label in drawn
    ]
    if len(runs) > 1 and handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=9)


def _line(ax: Axes, xs: list[int], ys: list[float], color: str, label: str, style: str = "-") -> None:
    """One run's series; nothing when it has no points, so absent metrics leave the panel empty."""
    if xs:
        marker = "o" if len(xs) <= MARKERS_UP_TO else None
        ax.plot(xs, ys, style, color=color, label=label, marker=marker, markersize=3, linewidth=1.4)


def _band(ax: Axes, records: list[dict[str, Any]], prefix: str, color: str) -> None:
    """Shade min..max of ``prefix/min`` and ``prefix/max`` where a step has both."""
    rows = [(r["step"], number(r.get(f"{prefix}/min")), number(r.get(f"{prefix}/max"))) for r in records]
    rows = [row for row in rows if row[1] is not None and row[2] is not None]
    if len(rows) > 1:
        steps, lows, highs = zip(*rows, strict=True)
        ax.fill_between(steps, lows, highs, color=color, alpha=0.15, linewidth=0)


def _finish(
    ax: Axes, title: str, xlabel: str, percent: bool = False, empty: str = "not logged in these runs"
) -> None:
    """Titles and ticks (whole steps, percentages); an empty panel says why instead of showing bare axes."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(labelsize=8)
    if not ax.has_data():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    ax.grid(alpha=0.3)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if ax.get_ylim()[0] < 0:  # a share that stayed at 0 would otherwise show negative percentages
            ax.set_ylim(bottom=0)
    if xlabel.endswith("step"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _metric_panel(
    ax: Axes, runs: list[RunData], key: str, title: str, band: bool = False, percent: bool = False
) -> None:
    """One RL metric over the steps, a line per run (and its min–max band for a ``…/mean`` key)."""
    for i, run in enumerate(runs):
        _line(ax, *series(run.rl, key), colour(i), run.label)
        if band and key.endswith("/mean"):
            _band(ax, run.rl, key.removesuffix("/mean"), colour(i))
    _finish(ax, title, "RL step", percent)


def _has(runs: list[RunData], stage: str, key: str) -> bool:
    """Whether any run logged a number under ``key`` in ``stage``."""
    return any(number(r.get(key)) is not None for run in runs for r in run.stages.get(stage, []))


def reward_figure(runs: list[RunData]) -> Figure | None:
    """Total reward and each component: mean per step, min–max band."""
    if not any(run.rl for run in runs):
        return None
    keys = {k for run in runs for r in run.rl for k in r}
    parts = [k.split("/") for k in keys]
    names = sorted({p[1] for p in parts if len(p) == 3 and p[0] == "reward" and p[2] == "mean"})
    title = "Reward per step (line: mean over the step's completions, band: min–max)"
    fig, axes = _figure(1 + len(names), title)
    _metric_panel(axes[0], runs, "reward/mean", "total reward", band=True)
    for ax, name in zip(axes[1:], names, strict=True):
        _metric_panel(ax, runs, f"reward/{name}/mean", name, band=True)
    return fig


def _eval_points(run: RunData) -> dict[int, float]:
    """Held-out accuracy by RL step: the eval before RL at 0, evals during RL, the final one at the last step."""
    points: dict[int, float] = dict(zip(*series(run.rl, "eval/accuracy"), strict=True))
    before = run.evals.get("sft") if "sft" in run.evals else run.evals.get("base")
    if run.rl and before and number(before.get("accuracy")) is not None:
        points[0] = before["accuracy"]
    for key, result in run.evals.items():
        accuracy = number(result.get("accuracy"))
        if accuracy is None:
            continue
        if key.startswith("rl-step") and key[7:].isdigit():
            points[int(key[7:])] = accuracy
        elif key == "rl" and run.rl:
            points[run.rl[-1]["step"]] = accuracy
    return dict(sorted(points.items()))


STAGE_ORDER = ("base", "sft", "rl")


def accuracy_figure(runs: list[RunData]) -> Figure | None:
    """Held-out accuracy (verifier) by stage, and along RL."""
    if not any(run.evals for run in runs) and not _has(runs, "rl", "eval/accuracy"):
        return None
    fig, (bars, curve) = _figure(2, "Held-out accuracy (judged by the verifier)")
    stages = [s for s in STAGE_ORDER if any(s in run.evals for run in runs)]
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [(j, number(run.evals.get(s, {}).get("accuracy"))) for j, s in enumerate(stages)]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, y in values if y is not None]
        ys = [y for _, y in values if y is not None]
        drawn = bars.bar(xs, ys, width=width * 0.95, color=colour(i), label=run.label)
        bars.bar_label(drawn, labels=[f"{y:.0%}" for y in ys], fontsize=7)
    names = {"base": "base model", "sft": "after SFT", "rl": "after RL"}
    bars.set_xticks(range(len(stages)), [names[s] for s in stages])
    bars.set_ylim(0, 1.08)
    _finish(bars, "by stage", "", percent=True)
    for i, run in enumerate(runs):
        points = _eval_points(run)
        _line(curve, list(points), list(points.values()), colour(i), run.label)
    _finish(curve, "along RL (step 0: before RL)", "RL step", percent=True)
    return fig


def length_figure(runs: list[RunData]) -> Figure | None:
    """Completion and reasoning lengths in tokens, and the share cut at max_new_tokens."""
    if not any(run.rl for run in runs):
        return None
    fig, axes = _figure(3, "Lengths (tokens; line: mean, band: min–max)")
    _metric_panel(axes[0], runs, "length/mean", "completion length", band=True)
    _metric_panel(axes[1], runs, "length/reasoning/mean", "reasoning length", band=True)
    _metric_panel(axes[2], runs, "truncated_share", "truncated at max_new_tokens", percent=True)
    return fig


def kl_clip_figure(runs: list[RunData]) -> Figure | None:
    """KL to the reference and the share of clipped token ratios."""
    if not any(run.rl for run in runs):
        return None
    fig, axes = _figure(2, "Policy update")
    _metric_panel(axes[0], runs, "train/kl", "KL to the reference")
    _metric_panel(axes[1], runs, "train/clip_frac", "clipped share of tokens", percent=True)
    return fig


PHASES = (
    ("time/generate_s", "generate", "-"),
    ("time/reward_s", "reward", "--"),
    ("time/train_s", "train", ":"),
)


def throughput_figure(runs: list[RunData]) -> Figure | None:
    """Generation speed and where each RL step's time goes; SFT training speed when there was SFT."""
    sources = (
        ("gen", "rl", "throughput/gen_tokens_per_s"),
        ("time", "rl", "time/train_s"),
        ("sft", "sft", "throughput/train_tokens_per_s"),
    )
    panels = [name for name, stage, key in sources if _has(runs, stage, key)]
    if not panels:
        return None
    fig, axes = _figure(len(panels), "Throughput")
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "gen":
            _metric_panel(ax, runs, "throughput/gen_tokens_per_s", "generated tokens / s")
        elif panel == "time":
            for i, run in enumerate(runs):
                for key, phase, style in PHASES:
                    _line(ax, *series(run.rl, key), colour(i), f"{run.label}: {phase}", style)
            _finish(ax, "seconds per RL step", "RL step")
            phases = [Line2D([], [], color="black", linestyle=style, label=p) for _, p, style in PHASES]
            ax.legend(handles=phases, fontsize=7)
        else:
            for i, run in enumerate(runs):
                _line(ax, *series(run.sft, "throughput/train_tokens_per_s"), colour(i), run.label)
            _finish(ax, "SFT tokens / s", "SFT step")
    return fig


def _failure_totals(run: RunData) -> dict[str, int]:
    """Failed completions by reason, summed over the run's RL steps."""
    totals: dict[str, int] = {}
    for record in run.rl:
        failures = record.get("failures")
        for reason, count in failures.items() if isinstance(failures, dict) else []:
            if number(count) is not None:
                totals[str(reason)] = totals.get(str(reason), 0) + int(count)
    return totals


def failures_figure(runs: list[RunData]) -> Figure | None:
    """Completions whose rewards failed, by reason over the whole run and per step."""
    if not any(run.rl for run in runs):
        return None
    fig, (bars, curve) = _figure(2, "Failed completions (a reward could not score them)")
    totals = [_failure_totals(run) for run in runs]
    reasons = sorted({reason for t in totals for reason in t})
    height = 0.8 / len(runs)
    for i, (run, t) in enumerate(zip(runs, totals, strict=True)):
        ys = [j + (i - (len(runs) - 1) / 2) * height for j in range(len(reasons))]
        bars.barh(ys, [t.get(r, 0) for r in reasons], height=height * 0.95, color=colour(i), label=run.label)
    bars.set_yticks(range(len(reasons)), [r if len(r) <= 40 else r[:39] + "…" for r in reasons])
    bars.invert_yaxis()
    _finish(bars, "by reason, all steps", "completions", empty="no failed completions")
    if reasons:
        bars.xaxis.set_major_locator(MaxNLocator(integer=True))
    _metric_panel(curve, runs, "failed", "per step")
    if curve.has_data():
        curve.yaxis.set_major_locator(MaxNLocator(integer=True))
        curve.set_ylim(0, max(1.0, curve.get_ylim()[1]))
    return fig


def sft_figure(runs: list[RunData]) -> Figure | None:
    """The SFT stage's loss and gradient norm."""
    if not any(run.sft for run in runs):
        return None
    fig, axes = _figure(2, "SFT")
    panels = (("loss", "loss (token-mean NLL)"), ("grad_norm", "gradient norm"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, run in enumerate(runs):
            _line(ax, *series(run.sft, key), colour(i), run.label)
        _finish(ax, title, "SFT step")
    return fig


FIGURES: tuple[tuple[str, str, Callable[[list[RunData]], Figure | None]], ...] = (
    ("reward", "Reward per component", reward_figure),
    ("accuracy", "Held-out accuracy", accuracy_figure),
    ("length", "Completion and reasoning length", length_figure),
    ("kl_clip", "KL and clip fraction", kl_clip_figure),
    ("throughput", "Throughput", throughput_figure),
    ("failures", "Failures by reason", failures_figure),
    ("sft", "SFT loss", sft_figure),
)


def write_plots(runs: list[RunData], out: Path) -> list[Plot]:
    """Each figure that has data, as ``out/<name>.png``."""
    plots = []
    for name, title, draw in FIGURES:
        fig = draw(runs)
        if fig is None:
            continue
        _run_legend(fig, runs)
        path = out / f"{name}.png"
        fig.savefig(path, format="png")
        plots.append(Plot(name, title, path))
    return plots
