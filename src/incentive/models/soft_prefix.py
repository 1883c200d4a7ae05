"""Soft prefix input adapter: K learned vectors of the LM's hidden size, made from a per-example feature, placed
among a prompt's token embeddings (before it, or at a marked token index) and fed through ``inputs_embeds``.

It is a reference path, apart from the fast ones: the model is not wrapped or patched (a model used without a
prefix runs exactly as before), training calls the plain Hugging Face forward, and :func:`greedy_generate` is a
small decode loop of its own that sends the prefix in the first pass only and reuses the KV cache after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

IGNORE = -100
"""Label of a position left out of the loss (prefix vectors, padding, prompt tokens)."""


class SoftPrefix(nn.Module):
    """A linear projector from a feature vector to ``tokens`` vectors of size ``hidden_size`` (LLaVA's and
    GETER's ``linear`` projector; ``tokens`` > 1 splits one wider output into several prefix vectors)."""

    def __init__(self, feature_dim: int, hidden_size: int, tokens: int = 1) -> None:
        super().__init__()
        self.tokens = tokens
        self.hidden_size = hidden_size
        self.proj = nn.Linear(feature_dim, tokens * hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) → (B, tokens, hidden_size)."""
        return self.proj(features).view(features.shape[0], self.tokens, self.hidden_size)


@dataclass(frozen=True)
class PrefixedBatch:
    """A left-padded batch ready for ``model(inputs_embeds=...)``: row i is padding, ``ids[:at]``, the K prefix
    vectors, ``ids[at:]``; ``labels`` holds the token ids under loss and :data:`IGNORE` everywhere else."""

    inputs_embeds: torch.Tensor
    """(B, T, H)"""
    attention_mask: torch.Tensor
    """(B, T): 1 on prefix vectors and tokens, 0 on padding."""
    position_ids: torch.Tensor
    """(B, T): 0, 1, ... from the first unpadded column; padding 0."""
    labels: torch.Tensor
    """(B, T) token ids where the row's loss mask is on, :data:`IGNORE` elsewhere (not yet shifted)."""

    def loss_columns(self) -> int:
        """The last columns whose logits the labels need (from the one before the first label to the end): the
        ``keep`` of :func:`prefixed_logits`, so the LM head runs on the completions only."""
        labelled = (self.labels != IGNORE).any(0).nonzero()
        return self.labels.shape[1] - int(labelled[0]) + 1 if len(labelled) else 1


def embed_with_prefix(
    embeddings: nn.Module,
    rows: Sequence[Sequence[int]],
    prefix: torch.Tensor | None = None,
    at: Sequence[int] | None = None,
    loss_masks: Sequence[Sequence[bool]] | None = None,
    pad_id: int = 0,
) -> PrefixedBatch:
    """Token embeddings of ``rows`` with ``prefix`` (B, K, H) inserted before token index ``at[i]`` of row i
    (default 0: before the prompt); without a prefix, the batch a plain left-padded ``input_ids`` call embeds."""
    k = 0 if prefix is None else prefix.shape[1]
    starts = [0] * len(rows) if at is None else list(at)
    if any(not 0 <= s <= len(r) for s, r in zip(starts, rows, strict=True)):
        raise ValueError("each prefix position must lie within its row (0 to its length)")
    width = max(len(r) for r in rows) + k
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    columns = torch.zeros(len(rows), k, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        first = width - len(row) - k
        token_cols = [first + j + (k if j >= start else 0) for j in range(len(row))]
        columns[i] = torch.arange(first + start, first + start + k)
        ids[i, token_cols] = torch.tensor(list(row), dtype=torch.long)
        mask[i, first:] = 1
        if loss_masks is not None:
            on = [c for c, keep in zip(token_cols, loss_masks[i], strict=True) if keep]
            labels[i, on] = ids[i, on]
    embeds = embeddings(ids)
    if prefix is not None:
        slots = torch.zeros(len(rows), width, dtype=torch.bool)
        slots[torch.arange(len(rows))[:, None], columns] = True
        placed = torch.zeros_like(embeds).index_put(
            (torch.arange(len(rows)).repeat_interleave(k), columns.flatten()),
            prefix.to(embeds.dtype).reshape(-1, embeds.shape[-1]),
        )
        embeds = torch.where(slots[..., None], placed, embeds)
    return PrefixedBatch(embeds, mask, (mask.cumsum(-1) - 1).clamp(min=0), labels)


def prefixed_logits(model: PreTrainedModel, batch: PrefixedBatch, keep: int = 0) -> torch.Tensor:
    """The model's plain forward over the batch: logits (B, T, V), or of the last ``keep`` columns only."""
    out = model(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=keep,
    )
    return out.logits


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the logprobs of its labelled tokens in order (the logits at column j predict column j + 1);
    ``logits`` may cover the last columns only (see :meth:`PrefixedBatch.loss_columns`)."""
    labels = labels[:, labels.shape[1] - logits.shape[1] :]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    on = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return [picked[i][on[i]] for i in range(labels.shape[0])]


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the labelled tokens, and how many there are (for a token mean)."""
    picked = label_logprobs(logits, labels)
    return -torch.cat(picked).sum(), sum(p.numel() for p in picked)


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel, batch: PrefixedBatch, max_new_tokens: int, stop_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy continuations of a (left-padded) batch: the first pass runs on ``inputs_embeds`` (prefix
    included), every later one on the new token alone with the KV cache; a row ends at a stop id (kept out)."""
    mask, positions = batch.attention_mask, batch.position_ids
    out = model(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    rows = batch.inputs_embeds.shape[0]
    done = torch.zeros(rows, dtype=torch.bool)
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    result: list[list[int]] = [[] for _ in range(rows)]
    position = positions[:, -1:]
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        done |= torch.isin(token, stops)
        for i in range(rows):
            if not done[i]:
                result[i].append(int(token[i]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        position = position + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            cache=out.cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return result
