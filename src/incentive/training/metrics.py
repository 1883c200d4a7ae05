"""Metrics as JSON lines (one per step), and small summary helpers."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from incentive.training.sinks import MetricsSink


def summarize(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """mean/min/max of the finite values under ``prefix/…``; empty when none are finite."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {}
    return {
        f"{prefix}/mean": sum(finite) / len(finite),
        f"{prefix}/min": min(finite),
        f"{prefix}/max": max(finite),
    }


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines past the checkpoint so nothing is doubled.
    Each record also goes to the live-logging ``sinks`` (TensorBoard, trackio, W&B) the recipe turned on."""

    def __init__(self, path: Path, sinks: Sequence[MetricsSink] = ()) -> None:
        self.path = path
        self.sinks = list(sinks)

    def truncate_after(self, stage: str, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line a killed process was writing
                continue
            if record.get("stage") == stage and record.get("step", 0) > step:
                continue
            kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        """Flush and close the sinks (the JSONL file is closed after every write)."""
        for sink in self.sinks:
            sink.close()
