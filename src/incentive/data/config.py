"""Where examples come from (a file, a reasoning-gym task or one of incentive's own) and how a file's columns map
onto Example."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

TASK_PREFIX = "task:"
FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_SUPPORTED = (
    ".jsonl or .json (JSON Lines), .csv, .parquet, or task:<name> for a reasoning-gym task or one of incentive's "
    "own (task:freeform)"
)


class DataConfig(BaseModel):
    """The data stage of a recipe; unknown keys fail so typos surface at load time, not mid-run."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description=f"A file path ({_SUPPORTED}).")
    size: int | None = Field(
        None, ge=1, description="Examples to generate for a task (default 100); for a file, an optional cap."
    )
    seed: int = Field(0, description="Seed of a task; the same seed gives the same examples.")
    task_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for reasoning_gym.create_dataset or one of incentive's own tasks (tasks only).",
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
        """The task name (reasoning-gym's or incentive's own), or None when the source is a file."""
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


SOURCE_SETTINGS: dict[str, tuple[str, ...]] = {
    "task": ("task_args", "seed", "size"),
    "file": ("size", "prompt_field", "reference_field", "id_field", "domain_field", "difficulty_field"),
}
"""The settings that describe one kind of source: a task's arguments, seed and example count; a file's columns
and row cap. They go with their source when --set swaps it for the other kind (``size`` means a different thing
for each)."""

DATA_SECTIONS: tuple[tuple[str, ...], ...] = (("data",), ("sft", "data"), ("eval", "data"))


def source_kind(source: object) -> str:
    """'task' for task:<name>, else 'file'."""
    return "task" if str(source).startswith(TASK_PREFIX) else "file"


def recipe_sources(tree: dict[str, Any]) -> dict[tuple[str, ...], str]:
    """The source each data section of a recipe file names, read before any --set override changes one."""
    sources = {}
    for section in DATA_SECTIONS:
        node = _section(tree, section)
        if node is not None and isinstance(node.get("source"), str):
            sources[section] = node["source"]
    return sources


def follow_source_overrides(
    tree: dict[str, Any], sources: dict[tuple[str, ...], str], given: list[list[str]]
) -> list[str]:
    """Make a recipe tree whose data source --set replaced usable with the new source, and say what changed.

    Only what the recipe file wrote is changed; a key given with --set (or under a section given whole) stays, so
    a real conflict is still an error. With the source of a data section swapped for the other kind, its settings
    for the old kind (``SOURCE_SETTINGS``) are dropped. With the training data replaced, the recipe's ``eval.data``
    (held out from the data it replaced, so it says nothing about the new data) is dropped, and its SFT stage is
    marked ``without_solutions: skip`` (it runs if the new data has worked solutions, else it is skipped, saying
    so). Returns one note per change."""

    def is_given(key: list[str]) -> bool:
        """The key, or a section above it, was given with --set."""
        return any(key[: len(keys)] == keys for keys in given)

    def touched(key: list[str]) -> bool:
        """The key, a section above it or a key under it was given with --set."""
        return is_given(key) or any(keys[: len(key)] == key for keys in given)

    notes = []
    replaced = set()
    for section, old in sources.items():
        node = _section(tree, section)
        if node is None or not is_given([*section, "source"]) or node.get("source") == old:
            continue
        replaced.add(section)
        name, new = ".".join(section), node.get("source")
        if source_kind(new) == source_kind(old):
            continue
        old_settings = SOURCE_SETTINGS[source_kind(old)]
        dropped = [key for key in old_settings if key in node and not is_given([*section, key])]
        for key in dropped:
            del node[key]
        if dropped:
            keys = ", ".join(f"{name}.{key}" for key in dropped)
            notes.append(
                f"{name}.source {new} replaces the recipe's {old}: dropped the recipe's {keys} "
                f"(settings for {source_kind(old)} sources)"
            )
    if ("data",) not in replaced:
        return notes
    held_out = sources.get(("eval", "data"))
    if held_out and not touched(["eval", "data"]):
        del tree["eval"]["data"]
        notes.append(
            f"data.source {tree['data']['source']} replaces the recipe's {sources[('data',)]}: dropped the "
            f"recipe's eval.data ({held_out}, held out from the data replaced); to evaluate on held-out data of "
            "yours: --set eval.data.source=FILE"
        )
    sft = tree.get("sft")
    if (
        isinstance(sft, dict)
        and sft.get("steps")
        and sft.get("data") is None
        and not is_given(["sft", "steps"])
        and not is_given(["sft", "without_solutions"])
    ):
        sft["without_solutions"] = "skip"
    return notes


def _section(tree: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The mapping at ``path`` in a recipe tree, or None."""
    node: Any = tree
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None
