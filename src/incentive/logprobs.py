"""Teacher-forced log-probabilities of target tokens after a context, batched with little padding.

Used by the trainer (with gradient) for policy logprobs of completions, and by rewards (without) to score
references, e.g. NOVER's reasoning perplexity. Sequences are sorted by length and packed into micro-batches under
a token budget, so padding stays small; results come back in input order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel


def plan_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split indices into micro-batches (longest first) whose padded size stays under ``max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and width * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def forward_target_logprobs(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    indices: Sequence[int],
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """One forward over ``indices``; logprob of each target token given everything before it.

    Rows are left-padded (with explicit position ids) so every target ends at the last position; the LM head
    then runs only on the last ``max target + 1`` positions instead of the whole sequence, which for a
    49k-token vocabulary is most of the cost of a short-completion batch.
    """
    seqs = [list(contexts[i]) + list(targets[i]) for i in indices]
    for i in indices:
        if targets[i] and not contexts[i]:
            raise ValueError("a target needs at least one context token before it")
    width = max(len(s) for s in seqs)
    keep = max(len(targets[i]) for i in indices) + 1
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    out: list[torch.Tensor] = []
    for row, i in enumerate(indices):
        n = len(targets[i])
        if n == 0:
            out.append(logits.new_zeros(0))
            continue
        step_logits = logits[row, keep - 1 - n : keep - 1].float()
        if temperature != 1.0:
            step_logits = step_logits / temperature
        tgt = torch.tensor(targets[i], dtype=torch.long)
        out.append(torch.log_softmax(step_logits, dim=-1).gather(-1, tgt[:, None]).squeeze(-1))
    return out


def target_logprobs(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    max_tokens: int = 4096,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Per-token logprobs of every target after its context, in input order; grad flows if enabled."""
    if len(contexts) != len(targets):
        raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
    lengths = [len(c) + len(t) for c, t in zip(contexts, targets, strict=True)]
    results: list[torch.Tensor | None] = [None] * len(contexts)
    for batch in plan_batches(lengths, max_tokens):
        for i, lp in zip(
            batch, forward_target_logprobs(model, contexts, targets, batch, temperature), strict=True
        ):
            results[i] = lp
    return [r for r in results if r is not None]
