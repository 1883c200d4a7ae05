"""Prompts must fit the model: template-rendered prompt tokens plus the completion budget within its context."""

from __future__ import annotations

from collections.abc import Callable

from incentive.data.config import DataConfig
from incentive.data.example import DataError, Example


def fit_to_context(
    examples: list[Example],
    cfg: DataConfig,
    count_tokens: Callable[[Example], int],
    max_new_tokens: int,
    context: int | None,
) -> tuple[list[Example], list[DataError]]:
    """The examples whose prompt leaves room for ``max_new_tokens`` in ``context``; a too-long prompt raises a
    DataError naming its row and field, or is left out and returned when ``cfg.on_error`` is 'skip'."""
    if context is None:
        return examples, []
    room = context - max_new_tokens
    field_name = "question" if cfg.task is not None else cfg.prompt_field
    kept: list[Example] = []
    skipped: list[DataError] = []
    for example in examples:
        tokens = count_tokens(example)
        if tokens <= room:
            kept.append(example)
            continue
        error = DataError(
            cfg.source,
            example.row,
            field_name,
            f"prompt is {tokens} tokens with the template; with up to {max_new_tokens} new tokens that exceeds "
            f"the model's context of {context} tokens",
        )
        if cfg.on_error == "raise":
            raise error
        skipped.append(error)
    if not kept:
        raise DataError(
            cfg.source, None, None, f"no examples fit the model's context (the first: {skipped[0]})"
        )
    return kept, skipped


def keep_usable(
    examples: list[Example], cfg: DataConfig, problem: Callable[[Example], str | None]
) -> tuple[list[Example], list[DataError]]:
    """The examples for which ``problem`` finds nothing wrong (e.g. a reward that cannot score them); another
    raises a DataError naming its row, or is left out and returned when ``cfg.on_error`` is 'skip'."""
    kept: list[Example] = []
    skipped: list[DataError] = []
    for example in examples:
        found = problem(example)
        if found is None:
            kept.append(example)
            continue
        error = DataError(cfg.source, example.row, None, found)
        if cfg.on_error == "raise":
            raise error
        skipped.append(error)
    if not kept:
        raise DataError(cfg.source, None, None, f"no usable examples (the first: {skipped[0]})")
    return kept, skipped
