"""Where examples come from (a file or a reasoning-gym task) and how a file's columns map onto Example."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

TASK_PREFIX = "task:"
FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_SUPPORTED = ".jsonl or .json (JSON Lines), .csv, .parquet, or task:<name> for a reasoning-gym task"


class DataConfig(BaseModel):
    """The data stage of a recipe; unknown keys fail so typos surface at load time, not mid-run."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description=f"A file path ({_SUPPORTED}).")
    size: int | None = Field(
        None, ge=1, description="Examples to generate for a task (default 100); for a file, an optional cap."
    )
    seed: int = Field(0, description="Seed of a reasoning-gym task; the same seed gives the same examples.")
    task_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for reasoning_gym.create_dataset (tasks only)."
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt (required, a string).")
    reference_field: str = Field(
        "reference", description="Column holding the reference answer (required; numbers become strings)."
    )
    id_field: str = Field("id", description="Column holding a unique id; default '<file stem>:<row>'.")
    domain_field: str = Field("domain", description="Column holding the domain (optional).")
    difficulty_field: str = Field("difficulty", description="Column holding a numeric difficulty (optional).")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A bad row stops loading ('raise') or is left out and reported ('skip')."
    )
    max_prompt_chars: int | None = Field(None, ge=1, description="A longer prompt is a data error.")
    allow_empty_reference: bool = Field(
        False, description="Accept rows whose reference is empty (otherwise a data error)."
    )

    @property
    def task(self) -> str | None:
        """The reasoning-gym task name, or None when the source is a file."""
        return self.source[len(TASK_PREFIX) :].strip() if self.source.startswith(TASK_PREFIX) else None

    @property
    def file_format(self) -> str | None:
        """'jsonl', 'csv' or 'parquet' for a file source; None for a task."""
        return None if self.task is not None else FILE_FORMATS[Path(self.source).suffix.lower()]

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.source.strip():
            raise ValueError(f"source is empty; give {_SUPPORTED}")
        if self.task is not None:
            if not self.task:
                raise ValueError(
                    f"source '{self.source}' names no task; write task:<name>, e.g. task:chain_sum"
                )
            clash = sorted({"size", "seed"} & set(self.task_args))
            if clash:
                raise ValueError(
                    f"task_args must not set {', '.join(clash)}; use the top-level size/seed fields"
                )
        else:
            suffix = Path(self.source).suffix.lower()
            if suffix not in FILE_FORMATS:
                raise ValueError(
                    f"source '{self.source}': unsupported file extension '{suffix or '(none)'}'; "
                    f"supported: {_SUPPORTED}"
                )
            if self.task_args:
                raise ValueError(f"task_args only apply to task:<name> sources, not to file '{self.source}'")
        fields = [
            self.prompt_field,
            self.reference_field,
            self.id_field,
            self.domain_field,
            self.difficulty_field,
        ]
        for name in fields:
            if fields.count(name) > 1:
                raise ValueError(f"column '{name}' is mapped to more than one of the *_field settings")
        return self
