"""Reward-model data: preference pairs {prompt, chosen, rejected} for Bradley–Terry training, or labelled
completions {prompt, completion, label} for regression, read from a file and checked row by row (a bad row names
its file, row and field)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from incentive.data.config import FILE_FORMATS
from incentive.data.example import DataError
from incentive.data.loaders import Row, file_rows, finite_number

Objective = Literal["bradley_terry", "regression"]


class PreferenceDataConfig(BaseModel):
    """Where a reward model's rows come from and which columns hold what; unknown keys fail."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="A .jsonl/.json (JSON Lines), .csv or .parquet file.")
    size: int | None = Field(None, ge=1, description="An optional cap on the rows read.")
    prompt_field: str = Field("prompt", description="Column holding the prompt (a string).")
    chosen_field: str = Field("chosen", description="bradley_terry: column holding the preferred response.")
    rejected_field: str = Field("rejected", description="bradley_terry: column holding the other response.")
    completion_field: str = Field("completion", description="regression: column holding the response.")
    label_field: str = Field("label", description="regression: column holding the response's score, a number.")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A bad row stops loading ('raise') or is left out and reported ('skip')."
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        suffix = Path(self.source).suffix.lower()
        if suffix not in FILE_FORMATS:
            raise ValueError(
                f"source '{self.source}': unsupported file extension '{suffix or '(none)'}'; "
                f"supported: {', '.join(FILE_FORMATS)}"
            )
        fields = [self.prompt_field, self.chosen_field, self.rejected_field, self.completion_field]
        fields.append(self.label_field)
        for name in fields:
            if fields.count(name) > 1:
                raise ValueError(f"column '{name}' is mapped to more than one of the *_field settings")
        return self

    def columns(self, objective: Objective) -> tuple[str, ...]:
        """The columns every row needs under ``objective``."""
        if objective == "bradley_terry":
            return self.prompt_field, self.chosen_field, self.rejected_field
        return self.prompt_field, self.completion_field, self.label_field


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    prompt: str
    chosen: str
    rejected: str
    row: int


@dataclass(frozen=True)
class LabelledCompletion:
    """A prompt with one response and the score a regression reward model should give it."""

    prompt: str
    completion: str
    label: float
    row: int


RewardRow = PreferencePair | LabelledCompletion


@dataclass(frozen=True)
class PreferenceData:
    """The rows read, and those left out (only with on_error='skip') so they can be counted and logged."""

    rows: list[RewardRow]
    skipped: list[DataError]


def load_preferences(cfg: PreferenceDataConfig, objective: Objective) -> PreferenceData:
    """Every row of ``cfg.source`` in the shape ``objective`` trains on; a bad row raises DataError, or is
    skipped with on_error='skip'."""
    file_format = FILE_FORMATS[Path(cfg.source).suffix.lower()]
    rows: list[RewardRow] = []
    skipped: list[DataError] = []
    for number, raw in file_rows(cfg.source, file_format, cfg.columns(objective)):
        try:
            if isinstance(raw, DataError):
                raise raw
            rows.append(_row(cfg, objective, number, raw))
        except DataError as error:
            if cfg.on_error == "raise":
                raise
            skipped.append(error)
            continue
        if cfg.size is not None and len(rows) >= cfg.size:
            break
    if not rows:
        why = f"all {len(skipped)} rows were skipped; the first: {skipped[0]}" if skipped else "no data rows"
        raise DataError(cfg.source, None, None, f"no reward-model rows ({why})")
    return PreferenceData(rows, skipped)


def _row(cfg: PreferenceDataConfig, objective: Objective, number: int, row: Row) -> RewardRow:
    """One checked row: its texts non-empty strings, its label a finite number."""

    def text(name: str) -> str:
        value = row.get(name)
        if value is None:
            raise DataError(cfg.source, number, name, "missing")
        if not isinstance(value, str):
            raise DataError(cfg.source, number, name, f"must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(cfg.source, number, name, "is empty")
        return value

    prompt = text(cfg.prompt_field)
    if objective == "bradley_terry":
        return PreferencePair(prompt, text(cfg.chosen_field), text(cfg.rejected_field), number)
    completion = text(cfg.completion_field)
    raw = row.get(cfg.label_field)
    if raw is None:
        raise DataError(cfg.source, number, cfg.label_field, "missing")
    label = finite_number(raw)
    if label is None:
        raise DataError(cfg.source, number, cfg.label_field, f"must be a finite number, got {raw!r}")
    return LabelledCompletion(prompt, completion, label, number)
