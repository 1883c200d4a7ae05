"""From a model's positions to log-probabilities of given next tokens.

With a 49k vocabulary the logits are the largest tensors of a training step ([rows, positions, 49152] in fp32,
plus their log-softmax and both gradients). :class:`FusedHead` never keeps them all: it runs the model's body,
and computes each target token's logprob from the hidden state in chunks of positions, recomputing the logits
chunk by chunk in the backward pass (all but the last, which is kept); padding positions are skipped. Models
whose head is more than one linear layer (logit soft-capping, scaling, a LoRA-wrapped head) go through
:class:`LogitsHead`, the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from incentive.grad_in_place import add_product, add_tensor, embedding_in_place, in_place_for
from incentive.kernels.log_softmax import log_softmax_backward_, target_log_softmax
from incentive.models import bf16_products
from incentive.models.lora import base_model
from incentive.models.onednn import OneDNNLinear, matmul, onednn_linear

# Model types whose logits are exactly lm_head(hidden state).
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3"})
CHUNK_POSITIONS = 256
# The last this many chunks' logits stay from the forward pass for the backward pass (<= 200 MB at a 49k
# vocabulary): a packed training pass of up to 1024 targets then runs its head product once each way.
KEPT_CHUNKS = 4


class LogitsHead:
    """The model's own forward; ``states`` are logits."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    def run(self, keep: int, **inputs: Any) -> tuple[Any, torch.Tensor]:
        """The cache and the states of the last ``keep`` positions."""
        out = self.model(logits_to_keep=keep, **inputs)
        return out.cache, out.logits

    def logprobs(
        self, states: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """[rows, positions] logprobs of ``tokens`` after each state (0 where ``mask`` is off), in one gather:
        per-row slicing of logits would make autograd allocate a full-size zero tensor for every row."""
        logits = states.float()
        if temperature != 1.0:
            logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
        return logp * mask


class FusedHead:
    """The model's body, then :func:`target_logprobs_from_hidden` with the head's weight (through oneDNN when
    the head's own layer is, see :mod:`incentive.models.onednn`)."""

    def __init__(self, body: torch.nn.Module, weight: torch.Tensor, onednn: bool = False) -> None:
        self.body = body
        self.weight = weight
        self.onednn = onednn

    def run(self, keep: int, **inputs: Any) -> tuple[Any, torch.Tensor]:
        ids = inputs.get("input_ids")
        if ids is not None:
            inputs = {**inputs, "input_ids": None, "inputs_embeds": self.embed(ids)}
        out = self.body(**inputs)
        return out.cache, out.last_hidden_state[:, -keep:]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The body's input embeddings of ``ids``, their weight gradient straight into ``.grad`` where
        :func:`incentive.grad_in_place.embedding_in_place` applies."""
        embedding = self.body.get_input_embeddings()
        embeds = embedding_in_place(embedding, ids)
        return embedding(ids) if embeds is None else embeds

    def logprobs(
        self, states: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        on = mask.bool()
        picked = target_logprobs_from_hidden(states[on], self.weight, tokens[on], temperature, self.onednn)
        return torch.zeros(mask.shape, dtype=picked.dtype, device=mask.device).index_put((on,), picked)


def head_for(model: PreTrainedModel) -> LogitsHead | FusedHead:
    """The fused head where the model's logits are a plain linear map of its last hidden state."""
    base = base_model(model)
    head = getattr(base, "lm_head", None)
    if (
        base.config.model_type in PLAIN_HEAD_TYPES
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and hasattr(base, "get_decoder")
    ):
        return FusedHead(base.get_decoder(), head.weight, isinstance(head, OneDNNLinear))
    return LogitsHead(model)


def target_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    onednn: bool = False,
) -> torch.Tensor:
    """log softmax(hidden · weightᵀ / temperature)[token] for each of N positions ([N, d] hidden, [N] tokens),
    holding at most ``CHUNK_POSITIONS`` rows of logits at a time, forward and backward; products through
    oneDNN if ``onednn``, else the default BLAS."""
    return _TargetLogprobs.apply(hidden, weight, tokens, temperature, onednn)


class _TargetLogprobs(torch.autograd.Function):
    """Logits chunk by chunk, each reduced to its tokens' logprobs (:mod:`incentive.kernels.log_softmax`). The
    last ``KEPT_CHUNKS`` chunks' logits are kept for the backward pass, which turns them into their gradient in
    place; earlier chunks are made again there. On the training path a pass's targets fit the kept chunks, so
    its head product runs once each way."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        temperature: float,
        onednn: bool,
    ) -> torch.Tensor:
        out = hidden.new_empty(hidden.shape[0])
        lse = hidden.new_empty(hidden.shape[0])
        parts = _chunks(hidden.shape[0])
        first_kept = len(parts) - KEPT_CHUNKS if any(ctx.needs_input_grad[:2]) else len(parts)
        kept: list[torch.Tensor] = []
        for k, part in enumerate(parts):
            logits = _logits(hidden[part], weight, onednn)
            out[part], lse[part] = target_log_softmax(logits, tokens[part], 1.0 / temperature)
            if k >= first_kept:
                kept.append(logits)
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.kept = kept
        ctx.temperature = temperature
        ctx.onednn = onednn
        ctx.in_place = in_place_for(weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, tokens, lse = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, []  # overwritten below: a second backward pass makes them again
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        d_hidden = torch.empty_like(hidden) if want_hidden else None

        def logit_gradient(part: slice) -> torch.Tensor:
            """The gradient of a chunk's logits, in place of them; called for the chunks last to first."""
            logits = kept.pop() if kept else _logits(hidden[part], weight, ctx.onednn)
            return log_softmax_backward_(logits, lse[part], tokens[part], grad[part], 1.0 / ctx.temperature)

        in_place = weight if want_weight and ctx.in_place else None
        products = _HeadProducts(logit_gradient, hidden, weight, d_hidden, want_weight, in_place)
        d_weight = products.bf16() if ctx.onednn and bf16_products.active() else products.by_chunk(ctx.onednn)
        return d_hidden, d_weight, None, None, None


@dataclass
class _HeadProducts:
    """The head's backward products: ``d_hidden`` filled chunk by chunk, the weight gradient added into
    ``in_place``'s ``.grad`` or returned; ``logit_gradient`` gives each chunk's logit gradient, chunks last to
    first."""

    logit_gradient: Callable[[slice], torch.Tensor]
    hidden: torch.Tensor
    weight: torch.Tensor
    d_hidden: torch.Tensor | None
    want_weight: bool
    in_place: torch.Tensor | None

    def by_chunk(self, onednn: bool) -> torch.Tensor | None:
        """Both products for each chunk, through oneDNN if ``onednn``, else the default BLAS."""
        hidden, weight, d_hidden = self.hidden, self.weight, self.d_hidden
        d_weight: torch.Tensor | None = None
        for part in reversed(_chunks(hidden.shape[0])):
            d_logits = self.logit_gradient(part)
            if d_hidden is not None:
                d_hidden[part] = onednn_linear(d_logits, weight.t()) if onednn else d_logits @ weight
            if self.in_place is not None:
                if onednn:
                    add_tensor(self.in_place, matmul(d_logits.t(), hidden[part]))
                else:
                    add_product(self.in_place, d_logits.t(), hidden[part])
            elif self.want_weight:
                part_weight = matmul(d_logits.t(), hidden[part]) if onednn else d_logits.t() @ hidden[part]
                # the first chunk's product is the sum so far: no zero-filled [vocab, d] tensor to add it to
                d_weight = part_weight if d_weight is None else d_weight.add_(part_weight)
            del d_logits  # freed before the next chunk's logits are made
        return d_weight

    def bf16(self) -> torch.Tensor | None:
        """With bf16 products (:mod:`incentive.models.bf16_products`): each chunk's logit gradient is rounded
        once, for both products, and the weight gradient's product runs once per ``KEPT_CHUNKS`` chunks,
        summing over all their positions: over one chunk's few positions its [vocab, d] result costs more to
        widen and add than the product itself. That result is rounded to bf16, as autocast rounds a weight's
        gradient, and added in fp32."""
        hidden, weight, d_hidden, in_place = self.hidden, self.weight, self.d_hidden, self.in_place
        d_weight: torch.Tensor | None = None
        positions = hidden.shape[0]
        parts = _chunks(positions)
        rounded_weight = bf16_products.rounded(weight)
        for end in range(len(parts), 0, -KEPT_CHUNKS):
            group = parts[max(0, end - KEPT_CHUNKS) : end]
            first, stop = group[0].start, min(group[-1].stop, positions)
            rounded_grads = hidden.new_empty((stop - first, weight.shape[0]), dtype=torch.bfloat16)
            for part in reversed(group):
                rows = rounded_grads[part.start - first : min(part.stop, positions) - first]
                rows.copy_(self.logit_gradient(part))
                if d_hidden is not None:
                    d_hidden[part] = bf16_products.product(rows, rounded_weight.t()).float()
            if self.want_weight:
                rounded_hidden = hidden[first:stop].to(torch.bfloat16)
                part_weight = bf16_products.product(rounded_grads.t(), rounded_hidden.t())
                holder = in_place.grad if in_place is not None else d_weight
                if holder is not None:
                    holder.add_(part_weight)
                elif in_place is not None:
                    in_place.grad = part_weight.float()
                else:
                    d_weight = part_weight.float()
        return d_weight


def _chunks(positions: int) -> list[slice]:
    return [slice(start, start + CHUNK_POSITIONS) for start in range(0, positions, CHUNK_POSITIONS)]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, onednn: bool) -> torch.Tensor:
    return (onednn_linear(hidden, weight) if onednn else F.linear(hidden, weight)).float().contiguous()
