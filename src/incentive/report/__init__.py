"""Run reports: ``incentive report RUN_DIR ...`` writes a self-contained HTML page with plots and sample
completions, several runs overlaid for comparison."""

from incentive.report.build import default_out, write_report
from incentive.report.loading import ReportError

__all__ = ["ReportError", "default_out", "write_report"]
