"""Make a report: load the run folders, write the PNG plots, then report.html with the plots embedded."""

from __future__ import annotations

from pathlib import Path

from incentive.report.html import render
from incentive.report.loading import load_runs
from incentive.report.plots import write_plots

HTML_NAME = "report.html"


def default_out(run_dirs: list[Path]) -> Path:
    """RUN_DIR/report for one run; ./report for a comparison of several."""
    return run_dirs[0] / "report" if len(run_dirs) == 1 else Path("report")


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write ``out/report.html`` and one PNG per plot beside it; returns the HTML's path."""
    runs = load_runs(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out)
    html = out / HTML_NAME
    html.write_text(render(runs, plots), encoding="utf-8")
    return html
