"""Per-sample perplexity of a corpus under a scoring LM: exp(mean negative log-likelihood of the scored
tokens), either of the response given its prompt (scope ``response``) or of the whole sequence (``full``).

A sequence longer than ``max_len`` tokens is scored with a sliding window: windows of at most ``max_len``
tokens start every ``stride`` tokens, and each scores only the tokens no earlier window scored, the rest of
the window being their context. Such a sample is marked truncated: some of its tokens were scored with part of
their context cut off. With ``max_len`` at least the sequence length there is one window and nothing is cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Scope = Literal["response", "full"]
TokenScorer = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Sequence[Sequence[float]]]
"""Natural-log probability of each target token after its context (and the target tokens before it)."""


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go through the model; those in ``[score_from, end)`` are scored."""

    begin: int
    score_from: int
    end: int


@dataclass(frozen=True)
class SamplePerplexity:
    """One sample's summed negative log-likelihood over its scored tokens, and how it was scored."""

    nll: float
    tokens: int
    windows: int
    truncated: bool

    @property
    def perplexity(self) -> float | None:
        """exp(mean NLL per scored token); None when no token was scored (e.g. an empty response)."""
        return math.exp(self.nll / self.tokens) if self.tokens else None


def plan_windows(length: int, first: int, max_len: int, stride: int) -> list[Window]:
    """The windows that score positions ``first`` to ``length - 1`` of a sequence once each (position 0 has no
    context and is never scored): at most ``max_len`` tokens, starting every ``stride`` tokens (every
    ``max_len - 1`` at most, so each scored token has some context)."""
    if max_len < 2 or not 1 <= stride <= max_len:
        raise ValueError(f"need max_len >= 2 and 1 <= stride <= max_len; got {max_len} and {stride}")
    windows: list[Window] = []
    begin = scored_to = 0
    while True:
        end = min(begin + max_len, length)
        score_from = max(scored_to, first, begin + 1)
        if score_from < end:
            windows.append(Window(begin, score_from, end))
        scored_to = end
        if end >= length:
            return windows
        begin = min(begin + stride, end - 1)  # the next window's first scored token keeps a token of context


def scored_sequence(context: Sequence[int], response: Sequence[int], scope: Scope) -> tuple[list[int], int]:
    """The token sequence of a sample and the first position scored: the response's first token (``response``)
    or the sequence's second (``full``)."""
    if scope not in ("response", "full"):
        raise ValueError(f"scope must be 'response' or 'full', got {scope!r}")
    return [*context, *response], len(context) if scope == "response" else 1


def perplexities(
    sequences: Sequence[tuple[Sequence[int], int]],
    score: TokenScorer,
    max_len: int,
    stride: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[SamplePerplexity]:
    """Each ``(tokens, first scored position)`` sequence scored window by window, ``batch_size`` windows to a
    scorer call (windows of similar length together, so little padding); results in input order."""
    plans = [plan_windows(len(tokens), first, max_len, stride) for tokens, first in sequences]
    pieces = [(owner, window) for owner, plan in enumerate(plans) for window in plan]
    pieces.sort(key=lambda piece: piece[1].end - piece[1].begin)
    nll = [0.0] * len(sequences)
    tokens = [0] * len(sequences)
    batches = range(0, len(pieces), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    for start in batches:
        chunk = pieces[start : start + batch_size]
        contexts = [sequences[owner][0][w.begin : w.score_from] for owner, w in chunk]
        targets = [sequences[owner][0][w.score_from : w.end] for owner, w in chunk]
        for (owner, _), target, logprobs in zip(chunk, targets, score(contexts, targets), strict=True):
            values = [float(v) for v in logprobs]
            if len(values) != len(target):
                raise ValueError(f"the scorer gave {len(values)} logprobs for {len(target)} target tokens")
            nll[owner] -= math.fsum(values)
            tokens[owner] += len(values)
    return [
        SamplePerplexity(nll[i], tokens[i], len(plan), any(w.begin > 0 for w in plan))
        for i, plan in enumerate(plans)
    ]


def box_stats(values: Sequence[float]) -> dict[str, float]:
    """Quartiles, Tukey whiskers (the furthest values within 1.5 IQR of the box), min and max."""
    data = np.asarray(values, dtype=np.float64)
    q1, median, q3 = (float(v) for v in np.percentile(data, [25, 50, 75]))
    reach = 1.5 * (q3 - q1)
    return {
        "q1": q1,
        "median": median,
        "q3": q3,
        "whisker_low": float(data[data >= q1 - reach].min()),
        "whisker_high": float(data[data <= q3 + reach].max()),
        "min": float(data.min()),
        "max": float(data.max()),
    }


def perplexity_summary(results: Sequence[SamplePerplexity]) -> dict[str, Any]:
    """Mean, median, std and box-plot numbers of the per-sample perplexities, the token-weighted corpus
    perplexity exp(total NLL / total scored tokens) (an addition to the paper's per-sample mean) and counts of
    truncated samples and of samples with no token to score."""
    values = [r.perplexity for r in results if r.perplexity is not None]
    scored = sum(r.tokens for r in results)
    summary: dict[str, Any] = {
        "count": len(values),
        "unscored": len(results) - len(values),
        "truncated": sum(r.truncated for r in results),
        "scored_tokens": scored,
        "token_weighted": math.exp(sum(r.nll for r in results) / scored) if scored else None,
    }
    if values:
        summary |= {"mean": float(np.mean(values)), "std": float(np.std(values)), **box_stats(values)}
    return summary


def model_scorer(model: PreTrainedModel, max_tokens: int = 4096) -> TokenScorer:
    """A TokenScorer over a causal LM: the toolkit's batched, gradient-free target logprobs (about
    ``max_tokens`` padded tokens a forward pass)."""
    import torch

    from incentive.logprob_backends import Fused

    backend = Fused()

    def score(contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[list[float]]:
        with torch.no_grad():
            return [lp.tolist() for lp in backend.score(model, contexts, targets, max_tokens)]

    return score


def context_renderer(
    tokenizer: PreTrainedTokenizerBase, kind: Literal["chat", "plain"]
) -> Callable[[str], str]:
    """How a prompt is laid out before its response: as the user turn of the tokenizer's chat template (when
    it has one) with the assistant turn opened, or as the bare prompt and a newline."""
    if kind == "chat" and tokenizer.chat_template:

        def chat(prompt: str) -> str:
            messages = [{"role": "user", "content": prompt}]
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

        return chat
    return lambda prompt: prompt + "\n"
