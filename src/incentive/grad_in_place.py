"""Weight gradients added straight into ``.grad`` for the vocabulary-sized weights of a training pass.

The embedding and the LM head are [vocab, d] (113 MB for the embedded model, one tensor when tied). Through
autograd, every backward pass makes a fresh dense gradient for each (the embedding's zero-filled, then a few
hundred rows added) and ``AccumulateGrad`` adds it to ``.grad``: with one backward pass per length bucket that
was ~5 zero-fills and ~8 additions of 113 MB per update, on a 2-core machine whose memory bandwidth is a few
GB/s. Inside :func:`gradients_in_place`, the head's chunks are multiplied into ``.grad`` (``addmm_``) and the
embedding's rows are added into it (``index_add_``), so ``.grad`` is the only [vocab, d] gradient allocated.

Only :func:`incentive.logprobs.backward_target_logprobs` turns this on: it calls ``loss.backward()``, which
is what accumulating into ``.grad`` means. Outside the context (``torch.autograd.grad`` for instance) the
gradients come back through autograd as usual.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F

_IN_PLACE = contextvars.ContextVar("gradients_in_place", default=False)


@contextlib.contextmanager
def gradients_in_place() -> Iterator[None]:
    """Forward passes run inside send the head's and the embedding's weight gradients into ``.grad``."""
    token = _IN_PLACE.set(True)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)


def in_place_for(weight: torch.Tensor) -> bool:
    """Whether a pass run now should add ``weight``'s gradient into its ``.grad`` itself."""
    return _IN_PLACE.get() and weight.is_leaf and weight.requires_grad


def add_product(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``weight.grad += a @ b`` without a temporary (the product becomes ``.grad`` if there is none yet)."""
    if weight.grad is None:
        weight.grad = a @ b
    else:
        weight.grad.addmm_(a, b)


def add_tensor(weight: torch.Tensor, grad: torch.Tensor) -> None:
    """``weight.grad += grad`` (``grad`` becomes ``.grad`` if there is none yet)."""
    if weight.grad is None:
        weight.grad = grad
    else:
        weight.grad.add_(grad)


def embedding_in_place(embedding: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor | None:
    """``embedding(ids)`` whose weight gradient is added into ``.grad`` row by row, or None where that does
    not apply (not in :func:`gradients_in_place`, frozen weight, or an embedding with max-norm renormalising,
    frequency scaling or sparse gradients, which the caller then runs as usual). The ``padding_idx`` row gets
    no gradient, as in ``nn.Embedding``."""
    weight = embedding.weight
    plain = embedding.max_norm is None and not embedding.scale_grad_by_freq and not embedding.sparse
    if not plain or not in_place_for(weight):
        return None
    return _EmbeddingRows.apply(ids, weight, embedding.padding_idx)


class _EmbeddingRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        (ids,) = ctx.saved_tensors
        weight: torch.Tensor = ctx.weight
        flat_ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:
            keep = flat_ids != ctx.padding_idx
            flat_ids, rows = flat_ids[keep], rows[keep]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, flat_ids, rows.to(weight.grad.dtype))
        return None, None, None
