"""Load Examples from JSON Lines, CSV, Parquet, a reasoning-gym task or one of incentive's own tasks, naming file,
row and field on bad data."""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from incentive.data.config import DataConfig
from incentive.data.example import DataError, Example
from incentive.data.tasks import TASKS

Row = dict[str, Any]
NumberedRows = Iterable[tuple[int, Row | DataError]]
DEFAULT_TASK_SIZE = 100
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of invalid UTF-8 bytes


@dataclass(frozen=True)
class LoadResult:
    """The loaded examples, and the rows left out (only with on_error='skip') so they can be counted and logged."""

    examples: list[Example]
    skipped: list[DataError] = field(default_factory=list)


def load_examples(cfg: DataConfig) -> LoadResult:
    """Read every example of ``cfg.source``; a bad row raises DataError, or is skipped with on_error='skip'."""
    task = cfg.task
    if task is not None and task in TASKS:
        return _collect(
            cfg, _own_task_rows(cfg, task), lambda number, row: _own_task_example(cfg, task, number, row)
        )
    if task is not None:
        return _collect(
            cfg, _task_rows(cfg, task), lambda number, entry: _task_example(cfg, task, number, entry)
        )
    rows = file_rows(cfg.source, str(cfg.file_format), (cfg.prompt_field, cfg.reference_field))
    stem = Path(cfg.source).stem
    return _collect(cfg, rows, lambda number, row: _file_example(cfg, stem, number, row))


def file_rows(source: str, file_format: str, required: Sequence[str]) -> NumberedRows:
    """The numbered rows of a jsonl, csv or parquet file (a row that cannot be read comes as its DataError);
    a missing file, or a tabular file without a ``required`` column, fails at once."""
    path = Path(source)
    if not path.exists():
        raise DataError(source, None, None, "file not found")
    if not path.is_file():
        raise DataError(source, None, None, "not a regular file")
    if file_format == "jsonl":
        return _jsonl_rows(source, path)
    reader = _csv_rows if file_format == "csv" else _parquet_rows
    return reader(source, path, required)


def _collect(cfg: DataConfig, rows: NumberedRows, to_example: Callable[[int, Row], Example]) -> LoadResult:
    """Validate rows in order, enforce unique ids and the size cap, and apply the on_error policy."""
    examples: list[Example] = []
    skipped: list[DataError] = []
    first_row_of: dict[str, int] = {}
    for number, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            example = to_example(number, row)
            if example.id in first_row_of:
                problem = f"duplicate id '{example.id}' (first used at row {first_row_of[example.id]})"
                raise DataError(cfg.source, number, cfg.id_field, problem)
        except DataError as error:
            if cfg.on_error == "raise":
                raise
            skipped.append(error)
            continue
        first_row_of[example.id] = number
        examples.append(example)
        if cfg.size is not None and len(examples) >= cfg.size:
            break
    if not examples:
        why = f"all {len(skipped)} rows were skipped; the first: {skipped[0]}" if skipped else "no data rows"
        raise DataError(cfg.source, None, None, f"no examples ({why})")
    return LoadResult(examples, skipped)


def _check_text_file(source: str, path: Path) -> None:
    """Fail clearly on binary (or UTF-16) files instead of reporting a confusing first-row error."""
    with path.open("rb") as f:
        if b"\x00" in f.read(8192):
            raise DataError(
                source,
                None,
                None,
                "contains NUL bytes: a binary file or not UTF-8 (e.g. UTF-16); expected UTF-8 text",
            )


def _jsonl_rows(source: str, path: Path) -> Iterator[tuple[int, Row | DataError]]:
    """One JSON object per line, streamed; the row number is the 1-based line number (blank lines are skipped)."""
    _check_text_file(source, path)
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield (
                    number,
                    DataError(source, number, None, f"invalid UTF-8 at byte offset {start + e.start}"),
                )
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, DataError(source, number, None, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                kind = type(row).__name__
                yield (
                    number,
                    DataError(source, number, None, f"expected one JSON object per line, got {kind}"),
                )
                continue
            yield number, row


def _csv_rows(source: str, path: Path, required: Sequence[str]) -> Iterator[tuple[int, Row | DataError]]:
    """A header row then data rows; the row number is the 1-based data row (the header is not counted)."""
    _check_text_file(source, path)
    number = 0
    with (
        path.open("rb") as raw,
        io.TextIOWrapper(raw, "utf-8-sig", errors="surrogateescape", newline="") as text,
    ):
        reader = csv.reader(text)
        try:
            header = next(reader, None)
            if header is None:
                return
            if any(_UNDECODABLE.search(column) for column in header):
                raise DataError(source, None, None, "the header has invalid UTF-8 bytes")
            _check_columns(source, header, required)
            for number, values in enumerate(reader, start=1):
                if not values:
                    continue
                if len(values) != len(header):
                    problem = f"has {len(values)} values but the header has {len(header)} columns"
                    yield number, DataError(source, number, None, problem)
                    continue
                row = dict(zip(header, values, strict=True))
                bad = next((column for column, value in row.items() if _UNDECODABLE.search(value)), None)
                yield number, DataError(source, number, bad, "invalid UTF-8 bytes") if bad else row
        except csv.Error as e:
            raise DataError(source, number + 1, None, f"unreadable CSV: {e}") from e


def _parquet_rows(source: str, path: Path, required: Sequence[str]) -> Iterator[tuple[int, Row | DataError]]:
    """Rows of a Parquet file, streamed batch by batch; the row number is the 1-based row index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        parquet = pq.ParquetFile(path)
        _check_columns(source, parquet.schema_arrow.names, required)
        for batch in parquet.iter_batches():
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except pa.ArrowException as e:
        at = None if number == 0 else number + 1
        raise DataError(source, at, None, f"not a readable Parquet file: {e}") from e


def _check_columns(source: str, columns: list[str], required: Sequence[str]) -> None:
    """Header-level checks for tabular files: one error up front rather than the same error on every row."""
    for column in columns:
        if columns.count(column) > 1:
            raise DataError(source, None, column, "the column appears more than once in the header")
    for name in required:
        if name not in columns:
            raise DataError(source, None, name, f"no such column; the columns are: {', '.join(columns)}")


def _file_example(cfg: DataConfig, stem: str, number: int, row: Row) -> Example:
    """Check one row and map it onto an Example; unmapped columns go to metadata."""
    source = cfg.source

    def fail(name: str, problem: str) -> DataError:
        return DataError(source, number, name, problem)

    prompt = row.get(cfg.prompt_field)
    if prompt is None:
        raise fail(cfg.prompt_field, "missing")
    if not isinstance(prompt, str):
        raise fail(cfg.prompt_field, f"must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise fail(cfg.prompt_field, "is empty")
    _check_prompt_length(cfg, number, cfg.prompt_field, prompt)

    reference = row.get(cfg.reference_field)
    if reference is None:
        raise fail(cfg.reference_field, "missing")
    if isinstance(reference, bool) or not isinstance(reference, str | int | float):
        raise fail(cfg.reference_field, f"must be a string or a number, got {type(reference).__name__}")
    if isinstance(reference, float) and not math.isfinite(reference):
        raise fail(cfg.reference_field, f"must be a finite number, got {reference}")
    reference = str(reference)
    if not reference.strip() and not cfg.allow_empty_reference:
        raise fail(
            cfg.reference_field, "is empty (set allow_empty_reference: true to accept empty references)"
        )

    id_ = _blank_to_none(row.get(cfg.id_field))
    if id_ is not None and (isinstance(id_, bool) or not isinstance(id_, str | int)):
        raise fail(cfg.id_field, f"must be a string or an integer, got {type(id_).__name__}")

    domain = _blank_to_none(row.get(cfg.domain_field))
    if domain is not None and not isinstance(domain, str):
        raise fail(cfg.domain_field, f"must be a string, got {type(domain).__name__}")

    difficulty = _blank_to_none(row.get(cfg.difficulty_field))
    if difficulty is not None:
        difficulty = finite_number(difficulty)
        if difficulty is None:
            raise fail(cfg.difficulty_field, f"must be a number, got {row[cfg.difficulty_field]!r}")

    mapped = {cfg.prompt_field, cfg.reference_field, cfg.id_field, cfg.domain_field, cfg.difficulty_field}
    return Example(
        prompt=prompt,
        reference=reference,
        id=f"{stem}:{number}" if id_ is None else str(id_),
        domain=domain,
        difficulty=difficulty,
        metadata={key: value for key, value in row.items() if key not in mapped},
        row=number,
    )


def _blank_to_none(value: Any) -> Any:
    """Optional columns: an empty cell (CSV writes missing values as '') means absent."""
    return None if isinstance(value, str) and not value.strip() else value


def finite_number(value: Any) -> float | None:
    """A finite float from a number or numeric text (CSV cells are text); None if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _check_prompt_length(cfg: DataConfig, number: int, name: str, prompt: str) -> None:
    if cfg.max_prompt_chars is not None and len(prompt) > cfg.max_prompt_chars:
        problem = f"prompt has {len(prompt)} characters, more than max_prompt_chars={cfg.max_prompt_chars}"
        raise DataError(cfg.source, number, name, problem)


def _task_rows(cfg: DataConfig, task: str) -> Iterator[tuple[int, Row | DataError]]:
    """Generate a reasoning-gym dataset; row numbers are 1-based entry indices."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        close = difflib.get_close_matches(task, [*DATASETS, *TASKS.names()], n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DataError(
            cfg.source,
            None,
            None,
            f"unknown reasoning-gym task '{task}'; {hint}list the {len(DATASETS)} task names with: "
            'python -c "from reasoning_gym.factory import DATASETS; print(sorted(DATASETS))"; '
            f"incentive's own tasks: {', '.join(TASKS.names())}",
        )
    size = DEFAULT_TASK_SIZE if cfg.size is None else cfg.size
    try:
        entries = list(reasoning_gym.create_dataset(task, size=size, seed=cfg.seed, **cfg.task_args))
    except (TypeError, ValueError, AssertionError) as e:
        problem = f"reasoning-gym task '{task}' rejected {cfg.task_args}: {e or type(e).__name__}"
        raise DataError(cfg.source, None, "task_args", problem) from e
    return ((index + 1, entry) for index, entry in enumerate(entries))


def _task_example(cfg: DataConfig, task: str, number: int, entry: Row) -> Example:
    _check_prompt_length(cfg, number, "question", entry["question"])
    return Example(
        prompt=entry["question"],
        reference=str(entry["answer"]),
        id=f"{task}:{cfg.seed}:{number - 1}",
        domain=task,
        difficulty=None,
        metadata={"task": task, "entry": entry},
        row=number,
    )


def _own_task_rows(cfg: DataConfig, task: str) -> Iterator[tuple[int, Row | DataError]]:
    """Generate one of incentive's own tasks (``TASKS``); row numbers are 1-based item indices."""
    size = DEFAULT_TASK_SIZE if cfg.size is None else cfg.size
    try:
        items = TASKS.get(task)(size, cfg.seed, **cfg.task_args)
    except (TypeError, ValueError) as e:
        raise DataError(cfg.source, None, "task_args", f"task '{task}' rejected {cfg.task_args}: {e}") from e
    return ((index + 1, asdict(item)) for index, item in enumerate(items))


def _own_task_example(cfg: DataConfig, task: str, number: int, row: Row) -> Example:
    _check_prompt_length(cfg, number, "question", row["question"])
    return Example(
        prompt=row["question"],
        reference=row["answer"],
        id=f"{task}:{cfg.seed}:{number - 1}",
        domain=row["domain"] or task,
        difficulty=None,
        metadata={"task": task, **row["metadata"]},
        row=number,
    )
