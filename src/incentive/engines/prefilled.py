"""The prompts' keys and values from the engine's prefill, kept for the update that follows on the same weights.

An RL update runs each distinct prompt through the policy once without gradient, so that the prompt's G
completions share its KV cache (:func:`incentive.logprobs.backward_target_logprobs`). That is the forward the
engine ran to start sampling, on the same weights when the update is the first since the rollout: on the
benchmark workload ~0.2 s of a ~4 s update. The engine keeps each prefill here and the update takes its rows.

An entry is used only while the policy's trainable parameters are the same tensors at the same version
(every optimizer step, checkpoint load or other in-place write bumps a tensor's version), for a policy without
dropout (sampling runs in eval mode, training in train mode), and only by a model whose head turns the final
hidden state into logits by one linear layer (the state kept is that hidden state). A LoRA policy samples with
its adapter merged, so its kept keys and values are the update's to fp32 rounding. Entries are dropped when the
engine hears that the weights changed (and any of older weights at the next prefill); all of them stay under a
byte budget.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache

MAX_BYTES = 256 * 2**20
"""Kept keys, values and states at most; a prefill that does not fit is not kept."""


@dataclass
class _Entry:
    version: tuple[tuple[int, int], ...]
    rows: dict[tuple[int, ...], int]
    cache: Cache
    last: torch.Tensor
    inputs: list[torch.Tensor]
    nbytes: int


class Prefill(NamedTuple):
    """Taken rows of a prefill: the cache, the last states and each layer's input hidden states [prompts,
    width, hidden] (empty where the prefill did not record them)."""

    cache: Cache
    last: torch.Tensor
    inputs: list[torch.Tensor]


class PrefilledPrompts:
    """Prefills of left-padded prompts on ``model``: per layer keys and values ``[prompts, kv heads, width,
    head dim]``, the final hidden state of each prompt's last token ``[prompts, 1, d]`` and, where the
    prefill recorded them, each layer's input hidden states ``[prompts, width, d]`` (the update runs the
    prompts' layers again from them one at a time, see
    :meth:`incentive.models.packed_body.PackedBody.backward_contexts`)."""

    def __init__(self, model: torch.nn.Module, max_bytes: int = MAX_BYTES) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self.entries: list[_Entry] = []
        self.version: tuple[tuple[int, int], ...] | None = None

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Prefills kept inside belong to the weights as they are on entry: a LoRA policy then samples with its
        adapter merged into copies and switched off (peft freezes the adapter's parameters meanwhile)."""
        self.version = weights_version(self.model)
        try:
            yield
        finally:
            self.version = None

    def put(
        self,
        contexts: Sequence[Sequence[int]],
        cache: Cache,
        last: torch.Tensor,
        inputs: Sequence[torch.Tensor] = (),
    ) -> None:
        """Keep a prefill of ``contexts`` (left-padded to the longest) made with the current weights, with its
        layers' inputs where recorded."""
        version = self.version if self.version is not None else weights_version(self.model)
        self.entries = [e for e in self.entries if e.version == version]
        if _has_dropout(self.model):
            return
        kept = copy.copy(cache)
        kept.layers = [copy.copy(layer) for layer in cache.layers]
        tensors = [last, *inputs, *(t for layer in kept.layers for t in (layer.keys, layer.values))]
        nbytes = sum(t.nbytes for t in tensors)
        if nbytes + sum(e.nbytes for e in self.entries) > self.max_bytes:
            return
        rows = {tuple(c): i for i, c in enumerate(contexts)}
        self.entries.append(_Entry(version, rows, kept, last, list(inputs), nbytes))

    def clear(self) -> None:
        """Drop every kept prefill (the engine does when told the weights changed)."""
        self.entries = []

    def take(self, model: torch.nn.Module, contexts: Sequence[tuple[int, ...]]) -> Prefill | None:
        """The cache, last states and layer inputs of ``contexts`` left-padded to the longest of them, as a
        prefill of just these would make them, if one kept prefill of ``model``'s current weights holds them
        all; else None."""
        if model is not self.model or not contexts or not self.entries:
            return None
        version = weights_version(self.model)
        width = max(len(c) for c in contexts)
        for entry in self.entries:
            if entry.version != version or not all(c in entry.rows for c in contexts):
                continue
            rows = torch.tensor([entry.rows[c] for c in contexts])
            cache = copy.copy(entry.cache)
            cache.layers = [copy.copy(layer) for layer in entry.cache.layers]
            for layer in cache.layers:
                start = layer.keys.shape[-2] - width
                layer.keys = layer.keys.narrow(-2, start, width).index_select(0, rows)
                layer.values = layer.values.narrow(-2, start, width).index_select(0, rows)
            inputs = [t.narrow(1, t.shape[1] - width, width).index_select(0, rows) for t in entry.inputs]
            return Prefill(cache, entry.last.index_select(0, rows), inputs)
        return None


def weights_version(model: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version of each trainable parameter: it changes whenever the policy does."""
    return tuple((id(p), p._version) for p in model.parameters() if p.requires_grad)


def _has_dropout(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    attention = float(getattr(config, "attention_dropout", 0.0) or 0.0)
    return attention > 0 or any(
        isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()
    )
