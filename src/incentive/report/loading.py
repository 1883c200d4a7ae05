"""Read run folders for the report: metrics.jsonl (skipping lines a killed process left half-written), evals.json
and config.yaml, each optional except the metrics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ReportError(RuntimeError):
    """A report that cannot be made, naming the folder at fault."""


@dataclass
class RunData:
    """One run folder's records by stage (each ordered by step), its evals and its resolved recipe."""

    label: str
    path: Path
    stages: dict[str, list[dict[str, Any]]]
    evals: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def sft(self) -> list[dict[str, Any]]:
        """The SFT records (none for an RL-only run)."""
        return self.stages.get("sft", [])

    @property
    def rl(self) -> list[dict[str, Any]]:
        """The RL records (none for an SFT-only run)."""
        return self.stages.get("rl", [])


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl, skipping lines that do not parse into one."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def by_stage(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by stage and sorted by step; a step logged twice (a resumed run) keeps its last record."""
    stages: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        step = record.get("step")
        if isinstance(record.get("stage"), str) and isinstance(step, int):
            stages.setdefault(record["stage"], {})[step] = record
    return {stage: [steps[s] for s in sorted(steps)] for stage, steps in stages.items()}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an optional file; empty when missing or unreadable (an older or unfinished run)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from an optional file; empty when missing or unreadable."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def load_run(path: Path, label: str | None = None) -> RunData:
    """A run folder's data; refuses a folder without metrics.jsonl."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{path} is not a run folder: it has no metrics.jsonl")
    return RunData(
        label=label or path.resolve().name,
        path=path,
        stages=by_stage(read_records(metrics)),
        evals={k: v for k, v in _read_json(path / "evals.json").items() if isinstance(v, dict)},
        config=_read_yaml(path / "config.yaml"),
    )


def load_runs(paths: list[Path]) -> list[RunData]:
    """Several runs, labelled by folder name, or by the path as given where two folder names clash."""
    names = [p.resolve().name for p in paths]
    return [load_run(p, str(p) if names.count(n) > 1 else n) for p, n in zip(paths, names, strict=True)]


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing keys, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, over the records that hold a finite value for it."""
    points = [(r["step"], number(r.get(key))) for r in records]
    kept = [(s, v) for s, v in points if v is not None]
    return [s for s, _ in kept], [v for _, v in kept]
