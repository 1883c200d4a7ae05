"""What ``incentive data-stats --out DIR`` writes: ``stats.json`` (every number), one PNG per plot and
``data-stats.html``, a self-contained page (plots inlined) with the side-by-side tables."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from incentive.analysis.data_corpus import TEXT_FIELDS
from incentive.analysis.data_pipeline import CorpusReport, comparison
from incentive.analysis.data_stats import ADDED_STATS, PAPER_STATS
from incentive.report.html import CSS, fmt

STATS_NAME = "stats.json"
HTML_NAME = "data-stats.html"
LENGTH_COLUMNS = (
    "count", "sum", "mean", "median", "std", "iqr", "p5", "p95", "cv", "share_short", "share_long",
    "bin_entropy",
)  # fmt: skip
PPL_COLUMNS = ("count", "mean", "median", "std", "q1", "q3", "token_weighted", "truncated", "unscored")
NOTES = {
    "paper_stats": list(PAPER_STATS),
    "added_stats": list(ADDED_STATS),
    "added_stats_note": "std, IQR, percentiles, coefficient of variation, tail masses (share_short: length < "
    "bin width; share_long: length >= cap) and the normalised entropy of the span histogram are additions of "
    "this tool; the paper argues length spread from its histogram and box plots only. The perplexity's "
    "token_weighted value is an addition too.",
    "perplexity_note": "Perplexity comes from the scoring model named in settings (by default a 135M "
    "model), a cheap proxy for the paper's 32B scorer: compare corpora with it, do not read its values as "
    "the paper's.",
}


def stats_document(reports: Sequence[CorpusReport], settings: dict[str, Any]) -> dict[str, Any]:
    """What ``stats.json`` holds: settings, notes on what the numbers are, the comparison, every corpus."""
    return {
        "tool": "incentive data-stats",
        "settings": settings,
        "notes": NOTES,
        "comparison": comparison(reports),
        "corpora": [report.stats for report in reports],
    }


def write_outputs(reports: Sequence[CorpusReport], settings: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``stats.json``, the PNGs and the HTML page into ``out``; their paths (JSON, HTML)."""
    out.mkdir(parents=True, exist_ok=True)
    document = stats_document(reports, settings)
    stats_path = out / STATS_NAME
    stats_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    plots = write_plots(reports, out)
    html_path = out / HTML_NAME
    html_path.write_text(render(document, plots), encoding="utf-8")
    return stats_path, html_path


def _figure(panels: int, title: str, width: float = 5.2) -> tuple[Figure, list[Axes]]:
    """A row of ``panels`` panels, ``width`` inches each."""
    fig = Figure(figsize=(width * panels, 3.8), dpi=96, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def write_plots(reports: Sequence[CorpusReport], out: Path) -> list[tuple[str, Path]]:
    """The span histogram, length and perplexity box plots and category shares as PNGs; (title, path) each."""
    plots = []
    labels = [r.label for r in reports]
    fig, (ax,) = _figure(1, "Response token spans: share of rows per bin", width=8)
    _histogram(ax, reports)
    plots.append(("Span histogram (response tokens)", _save(fig, out / "histogram.png")))

    fig, (ax,) = _figure(1, "Response tokens per row (box: quartiles, ◆: mean)")
    _boxes(ax, [r.response_lengths for r in reports], labels, "tokens")
    plots.append(("Response length", _save(fig, out / "lengths.png")))

    if any(r.stats["perplexity"] for r in reports):
        fig, (ax,) = _figure(1, "Per-row perplexity (box: quartiles, ◆: mean)")
        _boxes(ax, [[v for v in r.perplexity if v is not None] for r in reports], labels, "perplexity")
        plots.append(("Perplexity", _save(fig, out / "perplexity.png")))

    fig, axes = _figure(2, "Category shares")
    names = list(dict.fromkeys(name for r in reports for name in r.stats["category"]["instance"]))
    for ax, level in zip(axes, ("instance", "token"), strict=True):
        _stacked(ax, [r.stats["category"][level] for r in reports], labels, names, f"{level} share")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 6), fontsize=8)
    plots.append(("Category shares (rows, response tokens)", _save(fig, out / "categories.png")))
    return plots


def _histogram(ax: Axes, reports: Sequence[CorpusReport]) -> None:
    """Side-by-side bars per bin, one per corpus: the share of its rows in that bin."""
    bins = reports[0].stats["histogram"]["bins"] if reports else []
    width = 0.8 / max(1, len(reports))
    for i, report in enumerate(reports):
        counts = np.asarray(report.stats["histogram"]["all"], dtype=float)
        ax.bar(np.arange(len(bins)) + i * width, counts / max(1.0, counts.sum()), width, label=report.label)
    ax.set_xticks(np.arange(len(bins)) + 0.4 - width / 2, bins, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("share of rows")
    ax.legend(fontsize=8)


def _boxes(ax: Axes, data: list[list[float]], labels: list[str], unit: str) -> None:
    """One box per corpus (whiskers at 1.5 IQR) with its mean marked; an empty corpus gets no box."""
    shown = [(label, values) for label, values in zip(labels, data, strict=True) if values]
    if not shown:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    ax.boxplot([v for _, v in shown], tick_labels=[label for label, _ in shown], showfliers=True)
    means = [float(np.mean(v)) for _, v in shown]
    ax.scatter(range(1, len(shown) + 1), means, marker="D", color="C3", zorder=3, label="mean")
    for x, mean in enumerate(means, start=1):
        text = f"{mean:.1f}" if mean >= 10 else f"{mean:.2f}"
        ax.annotate(text, (x, mean), xytext=(8, 0), textcoords="offset points", fontsize=8, color="C3")
    ax.set_ylabel(unit)


def _stacked(
    ax: Axes, tables: list[dict[str, dict[str, Any]]], labels: list[str], names: list[str], title: str
) -> None:
    """A horizontal bar per corpus (the first on top), split into the shares of the groups ``names``, each in
    the same colour in every panel."""
    left = np.zeros(len(tables))
    for k, name in enumerate(names):
        values = np.asarray([table.get(name, {}).get("share") or 0.0 for table in tables])
        ax.barh(labels, values, left=left, label=name, color=f"C{k % 10}")
        left += values
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path)
    return path


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table from headings and already escaped cells."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    heads = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table>"


def _lengths_section(corpora: list[dict[str, Any]]) -> str:
    parts = []
    for name in TEXT_FIELDS:
        rows = []
        for corpus in corpora:
            block = corpus["lengths"][name]
            groups = [("all", block["all"])]
            if len(block["by_group"]) > 1:
                groups += list(block["by_group"].items())
            for group, stats in groups:
                cells = [escape(corpus["label"]), escape(group)] + [fmt(stats.get(c)) for c in LENGTH_COLUMNS]
                rows.append([*cells, fmt(block["missing"]) if group == "all" else ""])
        parts.append(f"<h3>{name}</h3>" + _table(["corpus", "category", *LENGTH_COLUMNS, "missing"], rows))
    return "".join(parts)


def _shares_section(corpora: list[dict[str, Any]], key: str) -> str:
    rows = []
    for corpus in corpora:
        block = corpus.get(key)
        if not block:
            continue
        for name, instance in block["instance"].items():
            token = block["token"].get(name, {})
            rows.append(
                [
                    escape(corpus["label"]),
                    escape(name),
                    fmt(instance["instances"]),
                    fmt(instance["share"], True),
                    fmt(token.get("tokens")),
                    fmt(token.get("share"), True),
                ]
            )
    if not rows:
        return f'<p class="muted">No {key} in these corpora.</p>'
    return _table(["corpus", key, "rows", "row share", "response tokens", "token share"], rows)


def _filters_section(corpora: list[dict[str, Any]]) -> str:
    rows = []
    for corpus in corpora:
        for report in corpus["filters"]:
            details = {k: v for k, v in report.items() if k not in ("filter", "removed", "rows")}
            rows.append(
                [
                    escape(corpus["label"]),
                    escape(report["filter"]),
                    fmt(report["removed"]),
                    escape(", ".join(map(str, report["rows"]))),
                    escape(json.dumps(details)),
                ]
            )
    if not rows:
        return '<p class="muted">No filters ran (--filter).</p>'
    return _table(["corpus", "filter", "rows removed", "first rows", "details"], rows)


def _perplexity_section(corpora: list[dict[str, Any]]) -> str:
    rows = []
    for corpus in corpora:
        block = corpus.get("perplexity")
        if not block:
            continue
        for group, stats in [("all", block["all"]), *block["by_category"].items()]:
            rows.append([escape(corpus["label"]), escape(group)] + [fmt(stats.get(c)) for c in PPL_COLUMNS])
    if not rows:
        return '<p class="muted">Perplexity was not computed (--no-perplexity).</p>'
    return _table(["corpus", "category", *PPL_COLUMNS], rows)


def _plots_section(plots: list[tuple[str, Path]]) -> str:
    figures = []
    for title, path in plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append(
            f"<figure><figcaption>{escape(title)}</figcaption>"
            f'<img src="data:image/png;base64,{data}" alt="{escape(title)}"></figure>'
        )
    return "".join(figures)


def render(document: dict[str, Any], plots: list[tuple[str, Path]]) -> str:
    """The whole page."""
    corpora = document["corpora"]
    head = ["corpus", *[k for k in document["comparison"][0] if k != "corpus"]] if corpora else ["corpus"]
    comparison_rows = [[fmt(row[k]) for k in head] for row in document["comparison"]]
    settings = "".join(
        f"<tr><td>{escape(key)}</td><td>{escape(json.dumps(value))}</td></tr>"
        for key, value in document["settings"].items()
    )
    title = escape(", ".join(c["label"] for c in corpora))
    notes = document["notes"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>incentive data-stats: {title}</title><style>{CSS}</style></head>
<body>
<h1>Distillation data statistics</h1>
<p class="muted">{len(corpora)} corpus/corpora · made by <code>incentive data-stats</code> · every number
is in {STATS_NAME}</p>
<h2>Side by side</h2>{_table(head, comparison_rows)}
<p class="muted">{escape(notes["added_stats_note"])}</p>
<h2>Plots</h2>{_plots_section(plots)}
<h2>Token lengths</h2>{_lengths_section(corpora)}
<h2>Categories</h2>{_shares_section(corpora, "category")}
<h2>Difficulty</h2>{_shares_section(corpora, "difficulty")}
<h2>Perplexity</h2><p class="muted">{escape(notes["perplexity_note"])}</p>{_perplexity_section(corpora)}
<h2>Filters</h2><p class="muted">Run in the order given, each on the rows the ones before it kept; the
statistics describe the rows kept.</p>{_filters_section(corpora)}
<h2>Settings</h2><table><tbody>{settings}</tbody></table>
</body></html>
"""
