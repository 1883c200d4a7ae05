"""A distillation corpus as ``incentive data-stats`` reads it: per row a prompt, a response (split into its
reasoning and answer parts), a category and a difficulty, from a jsonl/csv/parquet file or from a task's
worked solutions. Bad rows raise DataError naming the file, the row and the field."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incentive.data.config import FILE_FORMATS, TASK_PREFIX
from incentive.data.example import DataError

TEXT_FIELDS = ("prompt", "response", "reasoning", "answer")
"""The texts of a row whose token lengths are measured."""


@dataclass(frozen=True)
class Fields:
    """Which columns of a file hold what; category and difficulty are optional in every row."""

    prompt: str = "prompt"
    response: str = "response"
    category: str = "category"
    difficulty: str = "difficulty"


@dataclass(frozen=True)
class Sample:
    """One row: the prompt, the whole response and its parts (None where the part is absent)."""

    prompt: str
    response: str
    reasoning: str | None
    answer: str | None
    category: str | None = None
    difficulty: str | None = None
    row: int = 0
    record: dict[str, Any] = field(default_factory=dict, compare=False)
    """The row as read (a task's: the generated fields), written back by ``--write-filtered``."""

    def text(self, name: str) -> str | None:
        """The text of one of ``TEXT_FIELDS``."""
        return {
            "prompt": self.prompt,
            "response": self.response,
            "reasoning": self.reasoning,
            "answer": self.answer,
        }[name]


@dataclass(frozen=True)
class Corpus:
    """The rows of one source, under a short label (the file stem or the task name)."""

    label: str
    source: str
    samples: list[Sample]


def split_response(text: str, think: str = "think", answer: str = "answer") -> tuple[str | None, str | None]:
    """The reasoning (inside the first ``<think>`` block) and the answer (inside the first ``<answer>`` block,
    or else whatever follows ``</think>``), each stripped; None for a part that is not there."""
    found = re.search(rf"<{re.escape(think)}>(.*?)</{re.escape(think)}>", text, re.DOTALL)
    reasoning = found.group(1).strip() if found else None
    tagged = re.search(rf"<{re.escape(answer)}>(.*?)</{re.escape(answer)}>", text, re.DOTALL)
    if tagged:
        return reasoning, tagged.group(1).strip()
    rest = text[found.end() :].strip() if found else ""
    return reasoning, rest or None


def make_sample(
    prompt: str,
    response: str,
    category: str | None = None,
    difficulty: str | None = None,
    row: int = 0,
    record: dict[str, Any] | None = None,
) -> Sample:
    """A Sample whose reasoning and answer are read from the response."""
    reasoning, answer = split_response(response)
    return Sample(prompt, response, reasoning, answer, category, difficulty, row, record or {})


def load_corpus(source: str, fields: Fields = Fields(), size: int | None = None, seed: int = 0) -> Corpus:
    """A file's rows (at most ``size``), or ``size`` items of ``task:<name>`` (default 100) with the task's
    worked solutions as responses in think/answer form."""
    if source.startswith(TASK_PREFIX):
        return Corpus(_label(source), source, _task_samples(source, size, seed))
    return Corpus(_label(source), source, _file_samples(source, fields, size))


def load_prompts(
    source: str, prompt_field: str = "prompt", size: int | None = None, seed: int = 0
) -> list[str]:
    """The prompts of an evaluation set (a file or a task), for decontamination."""
    if source.startswith(TASK_PREFIX):
        return [sample.prompt for sample in _task_samples(source, size, seed, solutions=False)]
    prompts = []
    for number, row in _rows(source, (prompt_field,)):
        prompts.append(_text(source, number, row, prompt_field))
        if size is not None and len(prompts) >= size:
            break
    return prompts


def unique_labels(corpora: Sequence[Corpus]) -> list[Corpus]:
    """The corpora with labels made distinct (``name``, ``name-2``, ...), so tables and files do not clash."""
    seen: dict[str, int] = {}
    out = []
    for corpus in corpora:
        seen[corpus.label] = seen.get(corpus.label, 0) + 1
        label = corpus.label if seen[corpus.label] == 1 else f"{corpus.label}-{seen[corpus.label]}"
        out.append(Corpus(label, corpus.source, corpus.samples))
    return out


def _label(source: str) -> str:
    return source[len(TASK_PREFIX) :].strip() if source.startswith(TASK_PREFIX) else Path(source).stem


def _rows(source: str, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The numbered rows of a file (see :func:`incentive.data.loaders.file_rows`), unreadable rows raised."""
    from incentive.data.loaders import file_rows

    suffix = Path(source).suffix.lower()
    if suffix not in FILE_FORMATS:
        known = ", ".join(sorted(FILE_FORMATS))
        raise DataError(source, None, None, f"unsupported file extension '{suffix or '(none)'}'; use {known}")
    for number, row in file_rows(source, FILE_FORMATS[suffix], required):
        if isinstance(row, DataError):
            raise row
        yield number, row


def _text(source: str, number: int, row: dict[str, Any], name: str) -> str:
    """A required string column."""
    value = row.get(name)
    if value is None:
        raise DataError(source, number, name, "missing")
    if not isinstance(value, str):
        raise DataError(source, number, name, f"must be a string, got {type(value).__name__}")
    return value


def _label_value(source: str, number: int, row: dict[str, Any], name: str) -> str | None:
    """An optional grouping column: a string or a number, read as its text; absent or blank is None."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(source, number, name, f"must be a string or a number, got {type(value).__name__}")
    return value.strip() if isinstance(value, str) else str(value)


def _file_samples(source: str, fields: Fields, size: int | None) -> list[Sample]:
    samples = []
    for number, row in _rows(source, (fields.prompt, fields.response)):
        samples.append(
            make_sample(
                _text(source, number, row, fields.prompt),
                _text(source, number, row, fields.response),
                _label_value(source, number, row, fields.category),
                _label_value(source, number, row, fields.difficulty),
                number,
                row,
            )
        )
        if size is not None and len(samples) >= size:
            break
    if not samples:
        raise DataError(source, None, None, "no data rows")
    return samples


def _task_samples(source: str, size: int | None, seed: int, solutions: bool = True) -> list[Sample]:
    """A task's items; with ``solutions``, their worked solutions in think/answer tags as responses."""
    from pydantic import ValidationError

    from incentive.config import ConfigError
    from incentive.data import DataConfig, load_examples, sft_pairs
    from incentive.templates import TagFormat

    try:
        config = DataConfig(source=source, size=size, seed=seed)
    except ValidationError as err:
        raise ConfigError(f"{source}: {err.errors()[0]['msg']}") from err
    examples = load_examples(config).examples
    responses = (
        [text for _, text in sft_pairs(examples, TagFormat(), source)] if solutions else [""] * len(examples)
    )
    return [
        make_sample(
            example.prompt,
            response,
            example.domain,
            None,
            example.row or index + 1,
            {
                "id": example.id,
                "prompt": example.prompt,
                "response": response,
                "reference": example.reference,
                "category": example.domain,
            },
        )
        for index, (example, response) in enumerate(zip(examples, responses, strict=True))
    ]
