"""The unit of training data: a prompt and its reference answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """Bad input data; the message names the file, the row (1-based) and the field."""

    def __init__(self, source: str, row: int | None, field_name: str | None, problem: str) -> None:
        where = source
        if row is not None:
            where += f", row {row}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.row = row
        self.field = field_name
        self.problem = problem


@dataclass(frozen=True)
class Example:
    """One prompt → reference pair, with optional domain, difficulty and free-form metadata."""

    prompt: str
    reference: str
    id: str = ""
    domain: str | None = None
    difficulty: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    row: int | None = field(default=None, hash=False, compare=False)
    """1-based row in its source, so later checks (e.g. prompt length in tokens) can name it."""
