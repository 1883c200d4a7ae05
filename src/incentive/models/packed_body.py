"""A Llama-family body over packed rows: targets that continue cached contexts, their tokens laid end to end.

Through the model's forward, the completions of a training batch ran right-padded in length buckets: on the
benchmark workload 12 % of the completion tokens computed were padding, each bucket was a pass of its own
(four or five, each with its fixed costs), and the products ran on a hundred to three hundred rows at a time.
Here every projection, norm and MLP runs once on the real tokens only ([tokens, hidden]); only attention sees
rows, copied into padded [rows, heads, width, head_dim] groups of similar length next to each row's context
keys and values, and gathered back. The modules are the model's own, called in the same order, and attention
is SDPA on the key/value heads (``enable_gqa``), the arithmetic of transformers' SDPA path; values and gradients
equal the padded forward's to fp32 rounding (tested).

With :func:`recompute_layers` on (``model.activation_checkpointing`` in a recipe), each decoder layer keeps only
its input for the backward pass and runs again there (``torch.utils.checkpoint``): about one more forward pass
of compute for a fraction of the activation memory, with the same gradients. Without it, each layer's two norm
outputs, SwiGLU product and attention output are still not kept but made again in the backward pass from tensors
it keeps anyway (:mod:`incentive.models.lean_saves`; the fused norm and MLP modules mark theirs, the body its
attention output): a few element-wise passes for four fewer activations per
layer, with the same gradients bit for bit.

The contexts the targets continue take their gradient last, through :meth:`PackedBody.backward_contexts`: their
layers run again one at a time, packed, from the input hidden states that the contexts' first (gradient-free)
forward recorded, each layer's backward pass before the next layer down, so a context keeps one layer's
activations alive instead of all of them, for no more compute than a forward with gradient.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from incentive.kernels.rotary import rotary
from incentive.models.lean_saves import lean_saves, remade
from incentive.models.llama_family import is_plain_llama_family
from incentive.models.lora import base_model


@dataclass(frozen=True)
class _AttentionGroup:
    """Consecutive rows of similar length that attend together: their tokens are ``tokens`` of the packed
    ones, ``slots`` [their tokens] places each in the padded [rows × width] layout (a row's slots past its end
    stay zero: causality keeps them out of the real queries' reach and their outputs are never read),
    ``owner`` gives each row's context and ``mask`` [rows, 1, width, context + width] what each slot sees."""

    tokens: slice
    slots: torch.Tensor
    owner: torch.Tensor
    width: int
    mask: torch.Tensor


@dataclass(frozen=True)
class PackedRows:
    """Target rows laid end to end: ``ids`` and ``positions`` [tokens], ``lengths`` per row and the attention
    groups (consecutive runs of rows)."""

    ids: torch.Tensor
    positions: torch.Tensor
    lengths: list[int]
    groups: list[_AttentionGroup]

    @classmethod
    def build(
        cls,
        targets: Sequence[Sequence[int]],
        starts: Sequence[int],
        owner: Sequence[int],
        context_mask: torch.Tensor,
        group_sizes: Sequence[int],
    ) -> PackedRows:
        """Rows ``targets`` (each non-empty) whose first token sits at position ``starts[row]`` after context
        ``owner[row]`` (a row of the left-padded [contexts, width] ``context_mask``); the first
        ``group_sizes[0]`` rows attend together, then the next ``group_sizes[1]``, and so on."""
        if any(not row for row in targets):
            raise ValueError("packed rows need at least one target token each")
        if sum(group_sizes) != len(targets) or min(group_sizes, default=1) < 1:
            raise ValueError(f"attention groups of {list(group_sizes)} rows do not cover {len(targets)} rows")
        lengths = [len(row) for row in targets]
        ids = torch.tensor([token for row in targets for token in row], dtype=torch.long)
        positions = torch.tensor([s + j for s, n in zip(starts, lengths, strict=True) for j in range(n)])
        seen = context_mask.bool()
        groups: list[_AttentionGroup] = []
        row = token = 0
        for size in group_sizes:
            members = range(row, row + size)
            width = max(lengths[r] for r in members)
            slots = torch.cat([k * width + torch.arange(lengths[r]) for k, r in enumerate(members)])
            picked = torch.tensor([owner[r] for r in members])
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            context = seen.index_select(0, picked)[:, None, :].expand(size, width, seen.shape[1])
            mask = torch.cat([context, causal.expand(size, width, width)], dim=2)[:, None]
            groups.append(_AttentionGroup(slice(token, token + len(slots)), slots, picked, width, mask))
            row, token = row + size, token + len(slots)
        return cls(ids, positions, lengths, groups)


_RECOMPUTE = "incentive_recompute_layers"


def recompute_layers(model: PreTrainedModel, on: bool = True) -> None:
    """Make the packed body of ``model`` recompute each layer's activations in the backward pass (or stop).
    Refused for a model the packed body cannot run: the padded path keeps every activation."""
    if on and PackedBody.for_model(model) is None:
        raise ValueError(
            "activation checkpointing needs a Llama, Mistral or Qwen2 model with SDPA attention, full attention "
            f"in every layer and no attention dropout (this is {type(base_model(model)).__name__})"
        )
    setattr(base_model(model).model, _RECOMPUTE, on)


def recomputes_layers(model: PreTrainedModel) -> bool:
    """Whether :func:`recompute_layers` is on for ``model``."""
    return bool(getattr(base_model(model).model, _RECOMPUTE, False))


class PackedBody:
    """The body's final hidden states [tokens, hidden] of packed rows, given the embedded tokens and each
    layer's context keys and values ([contexts, kv heads, context width, head dim], as a transformers cache
    holds them after the contexts' forward)."""

    lean = True
    """Whether activations are remade instead of kept (:mod:`incentive.models.lean_saves`); off only to compare."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.body = base_model(model).model
        self.recompute = recomputes_layers(model)
        attention = self.body.layers[0].self_attn
        self.apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] = sys.modules[
            type(attention).__module__
        ].apply_rotary_pos_emb

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> PackedBody | None:
        """The packed body where ``model`` is a plain Llama-family model
        (:func:`incentive.models.llama_family.is_plain_llama_family`) without attention dropout or gradient
        checkpointing (its layers' own call does that); None otherwise (the caller then runs the padded
        forward)."""
        if not is_plain_llama_family(model) or getattr(base_model(model).config, "attention_dropout", 0.0):
            return None
        if any(getattr(layer, "gradient_checkpointing", False) for layer in base_model(model).model.layers):
            return None
        return cls(model)

    def __call__(
        self, embeds: torch.Tensor, rows: PackedRows, context_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        cos, sin = self.body.rotary_emb(embeds[None], rows.positions[None])
        cos, sin = cos[0], sin[0]
        hidden = embeds
        recompute = self.recompute and torch.is_grad_enabled()
        lean = self.lean and torch.is_grad_enabled() and not recompute
        with lean_saves() if lean else contextlib.nullcontext():
            for layer, (keys, values) in zip(self.body.layers, context_kv, strict=True):
                if recompute:
                    hidden = checkpoint(
                        self._layer_kv, layer, hidden, cos, sin, keys, values, rows, use_reentrant=False
                    )[0]
                else:
                    hidden = self._layer_kv(layer, hidden, cos, sin, keys, values, rows)[0]
        return self.body.norm(hidden)

    def _layer_kv(
        self,
        layer: torch.nn.Module,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: PackedRows,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder layer on the packed tokens ``hidden`` [tokens, hidden size]: its output and the tokens'
        own keys (rotated) and values [tokens, kv heads, head dim], as a cache would keep them."""
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (len(x), -1, attention.head_dim)
        q = attention.q_proj(x).view(shape)
        k = attention.k_proj(x).view(shape)
        v = attention.v_proj(x).view(shape)
        q, k = rotary(q, k, cos, sin, self.apply_rotary)
        outs = [_attend(group, q, k, v, keys, values, attention.scaling) for group in rows.groups]
        attended = remade(_gathered(outs, rows.groups), functools.partial(_gathered, outs, rows.groups))
        hidden = hidden + attention.o_proj(attended)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), k, v

    @contextlib.contextmanager
    def recording_inputs(self) -> Iterator[list[torch.Tensor]]:
        """Inside, a forward of the model (its own, left-padded) appends each decoder layer's input hidden
        states [rows, width, hidden size] to the list given: what :meth:`backward_contexts` needs to run the
        layers again one at a time."""
        inputs: list[torch.Tensor] = []

        def record(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            inputs.append((args[0] if args else kwargs["hidden_states"]).detach())

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.body.layers]
        try:
            yield inputs
        finally:
            for handle in handles:
                handle.remove()

    def backward_contexts(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        contexts: Sequence[Sequence[int]],
        mask: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        kv_grads: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]],
        last_grad: torch.Tensor | None,
    ) -> None:
        """Send the gradients of left-padded contexts' KV cache (per layer, [contexts, kv heads, width, head
        dim]) and of their last tokens' final states ([contexts, 1, hidden]) back into the parameters, one
        layer at a time from the top: each layer runs again on its recorded input (``inputs``, from
        :meth:`recording_inputs`; ``mask`` [contexts, width] marks the real tokens), packed, and its backward
        pass runs before the next layer down is made. Only one layer's activations are alive at a time, where
        a forward of all layers with gradient keeps them all; the compute is the same (one forward, one
        backward). ``embed`` gives the token embeddings, with gradient where they are trained."""
        count, width = mask.shape
        real = mask.flatten().nonzero().squeeze(1)
        rows = PackedRows.build(contexts, [0] * count, list(range(count)), mask[:, :0], [count])

        def packed(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(count * width, *t.shape[2:]).index_select(0, real)

        first = packed(inputs[0])
        cos, sin = self.body.rotary_emb(first[None], rows.positions[None])
        cos, sin = cos[0], sin[0]
        lasts = torch.tensor(rows.lengths).cumsum(0) - 1
        top = len(self.body.layers) - 1
        embedding = self.body.get_input_embeddings()
        grad = None if last_grad is None else last_grad[:, -1]
        for index in range(top, -1, -1):
            layer = self.body.layers[index]
            wanted = index > 0 or embedding.weight.requires_grad
            hidden = (first if index == 0 else packed(inputs[index])).requires_grad_(wanted)
            attention = layer.self_attn
            empty = hidden.new_zeros(count, attention.config.num_key_value_heads, 0, attention.head_dim)
            out, k, v = self._layer_kv(layer, hidden, cos, sin, empty, empty, rows)
            if index == top:
                out = self.body.norm(out.index_select(0, lasts))
            pairs = zip((k, v), kv_grads[index], strict=True)
            sent = [(t, packed(g.transpose(1, 2))) for t, g in pairs if g is not None]
            if grad is not None:
                sent.append((out, grad))
            sent = [(t, g) for t, g in sent if t.requires_grad]
            if sent:
                torch.autograd.backward([t for t, _ in sent], [g for _, g in sent])
            grad = hidden.grad if wanted else None
        if grad is not None:
            torch.autograd.backward([embed(rows.ids)], [grad])


def _gathered(outs: Sequence[torch.Tensor], groups: Sequence[_AttentionGroup]) -> torch.Tensor:
    """The packed tokens' attention outputs [tokens, heads × head dim] from each group's SDPA output
    [rows, heads, width, head dim]."""
    return torch.cat(
        [
            out.transpose(1, 2).reshape(len(group.owner) * group.width, -1).index_select(0, group.slots)
            for out, group in zip(outs, groups, strict=True)
        ]
    )


def _attend(
    group: _AttentionGroup,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_keys: torch.Tensor,
    context_values: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """SDPA's output [rows, heads, width, head dim] for one group. Tokens go into the padded layout with
    ``index_copy_`` (its backward pass gathers their gradients); :func:`_gathered` takes them back out."""
    rows = len(group.owner)

    def padded(t: torch.Tensor) -> torch.Tensor:
        part = t[group.tokens]
        slots = part.new_zeros(rows * group.width, *part.shape[1:]).index_copy_(0, group.slots, part)
        return slots.view(rows, group.width, *part.shape[1:]).transpose(1, 2)

    keys = torch.cat([context_keys.index_select(0, group.owner), padded(k)], dim=2)
    values = torch.cat([context_values.index_select(0, group.owner), padded(v)], dim=2)
    return F.scaled_dot_product_attention(
        padded(q), keys, values, attn_mask=group.mask, scale=scaling, enable_gqa=True
    )
