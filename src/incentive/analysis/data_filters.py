"""Quality filters of a distillation corpus, each saying which rows it would drop: high-frequency n-grams,
missing think/answer parts, exact duplicates and overlap with evaluation sets (exact, or by embedding
cosine)."""

from __future__ import annotations

import importlib
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # kept light: the command line reads FILTERS while building its parser
    import numpy as np

    from incentive.analysis.data_corpus import Sample

FILTERS = ("dedup", "decontam", "ngram", "structure")
"""Every filter, in the order ``all`` runs them: the paper's query clean-up, then its response checks."""
Embedder = Callable[[Sequence[str]], Any]
"""Texts to an (n, d) array of embeddings (normalised or not: rows are normalised before the cosine)."""
DedupKey = Literal["prompt", "pair"]
_SPACE = re.compile(r"\s+")


def ngram_frequency(
    sequences: Sequence[Sequence[Hashable]], n: int = 20, min_count: int = 20
) -> dict[tuple[Hashable, ...], int]:
    """The n-token spans occurring more than ``min_count`` times over all sequences (every occurrence counts,
    within a row as across rows), with their counts, most frequent first."""
    if n < 1 or min_count < 0:
        raise ValueError(f"need n >= 1 and min_count >= 0, got n {n}, min_count {min_count}")
    counts: Counter[tuple[Hashable, ...]] = Counter()
    for tokens in sequences:
        counts.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return {gram: count for gram, count in counts.most_common() if count > min_count}


def ngram_flags(
    flagged: dict[tuple[Hashable, ...], int], sequences: Sequence[Sequence[Hashable]], n: int
) -> list[bool]:
    """Whether each sequence holds one of the ``flagged`` n-grams."""
    return [
        any(tuple(tokens[i : i + n]) in flagged for i in range(len(tokens) - n + 1)) for tokens in sequences
    ]


def structure_flags(samples: Sequence[Sample]) -> list[bool]:
    """Rows whose response lacks a think part or an answer part (an empty answer counts as lacking)."""
    return [sample.reasoning is None or not sample.answer for sample in samples]


def duplicate_flags(samples: Sequence[Sample], key: DedupKey = "prompt") -> list[bool]:
    """Rows repeating an earlier row's prompt (``prompt``) or prompt and response (``pair``) exactly; the
    first occurrence stays."""
    seen: set[tuple[str, ...]] = set()
    flags = []
    for sample in samples:
        value = (sample.prompt,) if key == "prompt" else (sample.prompt, sample.response)
        flags.append(value in seen)
        seen.add(value)
    return flags


def normalise(text: str) -> str:
    """Text for exact matching: case folded, runs of whitespace made one space, ends stripped."""
    return _SPACE.sub(" ", text).strip().casefold()


def decontaminate(
    prompts: Sequence[str],
    eval_prompts: Sequence[str],
    embedder: Embedder | None = None,
    threshold: float = 0.9,
) -> list[str | None]:
    """Why each prompt counts as contaminated, None when it does not: ``exact`` when it equals an evaluation
    prompt (after :func:`normalise`), else with an ``embedder`` ``cosine 0.95`` when its highest cosine to an
    evaluation prompt is above ``threshold``."""
    known = {normalise(text) for text in eval_prompts}
    reasons: list[str | None] = ["exact" if normalise(text) in known else None for text in prompts]
    rest = [i for i, reason in enumerate(reasons) if reason is None]
    if embedder is None or not rest or not eval_prompts:
        return reasons
    best = _max_cosine(embedder([prompts[i] for i in rest]), embedder(list(eval_prompts)))
    for i, cosine in zip(rest, best, strict=True):
        if cosine > threshold:
            reasons[i] = f"cosine {cosine:.3f}"
    return reasons


def _max_cosine(rows: Any, columns: Any) -> list[float]:
    """For each row vector, its highest cosine to any column vector."""
    import numpy as np

    a = _unit(np.asarray(rows, dtype=np.float64))
    b = _unit(np.asarray(columns, dtype=np.float64))
    return [float(v) for v in (a @ b.T).max(axis=1)]


def _unit(vectors: np.ndarray) -> np.ndarray:
    import numpy as np

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def load_embedder(name: str) -> Embedder:
    """``minilm`` (all-MiniLM-L6-v2 sentence embeddings, shipped offline with the toolkit) or
    ``MODULE:FUNCTION`` naming any callable from a list of texts to an (n, d) array."""
    if name == "minilm":
        from incentive.rewards.similarity import sentence_encoder

        encoder = sentence_encoder()
        return lambda texts: encoder.encode(list(texts), normalize_embeddings=True)
    module, _, function = name.partition(":")
    if not module or not function:
        raise ValueError(f"embedder must be 'minilm' or MODULE:FUNCTION, got {name!r}")
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load embedder {name!r}: {err}") from err
    if not callable(found):
        raise ValueError(f"embedder {name!r} is not callable")
    return found
