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


def _figure(panels: int, title: str, cols: int = 3) -> tuple[Figure, list[Axes]]:
    """A grid of up to ``cols`` panels a row."""
    cols = min(cols, panels)
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


Point = tuple[float, float | None, float | None]
"""A held-out rate and its 95 % interval (None where the eval stored none)."""


def _rate(result: Any, key: str) -> Point | None:
    """``result[key]`` with its ``key_ci`` interval, None when the eval has no such rate."""
    rate = number(result.get(key)) if isinstance(result, dict) else None
    if rate is None:
        return None
    interval = result.get(f"{key}_ci")
    if not (isinstance(interval, list) and len(interval) == 2):
        return rate, None, None
    return rate, number(interval[0]), number(interval[1])


def _eval_points(run: RunData, key: str = "accuracy") -> dict[int, Point]:
    """A held-out rate by RL step: the eval before RL at 0, evals during RL, the final one at the last step."""
    points: dict[int, Point] = {}
    if key == "accuracy":  # runs whose evals.json is gone still logged the periodic accuracy
        points.update((s, (v, None, None)) for s, v in zip(*series(run.rl, "eval/accuracy"), strict=True))
    before = _rate(run.evals.get("sft") if "sft" in run.evals else run.evals.get("base"), key)
    if run.rl and before:
        points[0] = before
    for name, result in run.evals.items():
        point = _rate(result, key)
        if point is None:
            continue
        if name.startswith("rl-step") and name[7:].isdigit():
            points[int(name[7:])] = point
        elif name == "rl" and run.rl:
            points[run.rl[-1]["step"]] = point
    return dict(sorted(points.items()))


STAGE_ORDER = ("base", "sft", "rl")
RATES = (("accuracy", "strict", "-", 1.0), ("accuracy_lenient", "any format", "--", 0.45))
"""Held-out rates drawn: key, label, line style and opacity (strict: the answer where the format puts it)."""


def _with_interval(
    ax: Axes, points: dict[int, Point], color: str, label: str, style: str, alpha: float
) -> None:
    """A rate along RL with its 95 % band (error bars where only one point has an interval)."""
    _line(ax, list(points), [p[0] for p in points.values()], color, label, style)
    known = [(s, lo, hi) for s, (_, lo, hi) in points.items() if lo is not None and hi is not None]
    if len(known) > 1:
        steps, lows, highs = zip(*known, strict=True)
        ax.fill_between(steps, lows, highs, color=color, alpha=0.15 * alpha, linewidth=0)
    elif known:
        (step, low, high), rate = known[0], points[known[0][0]][0]
        ax.errorbar([step], [rate], [[rate - low], [high - rate]], color=color, alpha=alpha, capsize=3)


def accuracy_figure(runs: list[RunData]) -> Figure | None:
    """Held-out accuracy (verifier) by stage and along RL, strict and regardless of format, with 95 % intervals."""
    if not any(run.evals for run in runs) and not _has(runs, "rl", "eval/accuracy"):
        return None
    title = "Held-out accuracy (judged by the verifier; bars and bands: 95 % intervals)"
    fig, (bars, curve) = _figure(2, title)
    stages = [s for s in STAGE_ORDER if any(s in run.evals for run in runs)]
    width = 0.8 / (len(runs) * len(RATES))
    for i, run in enumerate(runs):
        for k, (key, _, _, alpha) in enumerate(RATES):
            values = [(j, _rate(run.evals.get(s), key)) for j, s in enumerate(stages)]
            shown = [(j, p) for j, p in values if p is not None]
            offset = (i * len(RATES) + k - (len(runs) * len(RATES) - 1) / 2) * width
            xs = [j + offset for j, _ in shown]
            ys = [p[0] for _, p in shown]
            errors = [
                [p[0] - p[1] if p[1] is not None else 0.0 for _, p in shown],
                [p[2] - p[0] if p[2] is not None else 0.0 for _, p in shown],
            ]
            drawn = bars.bar(xs, ys, width=width * 0.95, color=colour(i), alpha=alpha, label=run.label)
            bars.errorbar(xs, ys, errors, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
            bars.bar_label(drawn, labels=[f"{y:.0%}" for y in ys], fontsize=7, label_type="center")
    names = {"base": "base model", "sft": "after SFT", "rl": "after RL"}
    bars.set_xticks(range(len(stages)), [names[s] for s in stages])
    bars.set_ylim(0, 1.05)
    _finish(bars, "by stage (solid: strict, pale: any format)", "", percent=True)
    for i, run in enumerate(runs):
        for key, label, style, alpha in RATES:
            _with_interval(curve, _eval_points(run, key), colour(i), f"{run.label}: {label}", style, alpha)
    _finish(curve, "along RL (step 0: before RL)", "RL step", percent=True)
    if curve.has_data():
        curve.set_ylim(0, 1.05)
        styles = [Line2D([], [], color="black", linestyle=style, label=label) for _, label, style, _ in RATES]
        curve.legend(handles=styles, fontsize=7)
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


def update_figure(runs: list[RunData]) -> Figure | None:
    """The RL optimiser's view: the loss, the gradient norm before clipping and the learning rate per step."""
    if not any(run.rl for run in runs):
        return None
    fig, axes = _figure(3, "RL update")
    _metric_panel(axes[0], runs, "train/loss", "loss")
    _metric_panel(axes[1], runs, "train/grad_norm", "gradient norm (before clipping)")
    _metric_panel(axes[2], runs, "lr", "learning rate")
    return fig


NO_SIGNAL = (
    ("advantage/zero_share", "completions with advantage 0", "-"),
    ("advantage/no_signal_group_share", "groups with equal rewards", "--"),
)


def signal_figure(runs: list[RunData]) -> Figure | None:
    """Whether the rewards gave the update anything to learn from, and how sure the policy has become."""
    if not any(run.rl for run in runs):
        return None
    fig, axes = _figure(4, "Learning signal and policy entropy", cols=2)
    _metric_panel(axes[0], runs, "advantage/mean", "advantage (line: mean, band: min–max)", band=True)
    _metric_panel(axes[1], runs, "advantage/std", "advantage std")
    for i, run in enumerate(runs):
        for key, label, style in NO_SIGNAL:
            _line(axes[2], *series(run.rl, key), colour(i), f"{run.label}: {label}", style)
    _finish(axes[2], "without signal", "RL step", percent=True)
    if axes[2].has_data():
        axes[2].set_ylim(0, 1.05)
        shares = [Line2D([], [], color="black", linestyle=s, label=label) for _, label, s in NO_SIGNAL]
        axes[2].legend(handles=shares, fontsize=7)
    entropy = "policy entropy, nats per token\n(estimate: mean −logprob of the sampled tokens)"
    _metric_panel(axes[3], runs, "policy/entropy_estimate", entropy)
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
    ("update", "RL loss, gradient norm and learning rate", update_figure),
    ("signal", "Advantages and policy entropy", signal_figure),
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
