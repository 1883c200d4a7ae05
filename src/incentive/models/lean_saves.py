"""Activations that autograd would keep for the backward pass but that are cheap to make again: kept as the
recipe that made them instead.

A decoder layer's products keep their inputs for their weight gradients: the normed hidden states (twice per
layer), the SwiGLU product and the attention output, about a third of what a layer keeps per token. Each of these
comes out of a cheap element-wise step (a norm, the activation, a gather) from tensors that autograd keeps
anyway (the norm's input, the gate and up projections, SDPA's output). Inside :func:`lean_saves`, a tensor
marked with :func:`remade` is not kept: a saved-tensor hook keeps the recipe, and the backward pass runs it
once, when the first product that needs the tensor asks for it; every product that saved the tensor gets that
one result, which is freed with the last of them. The recipe repeats the forward's own arithmetic on the same
inputs, so values, and gradients, are the same bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

_Marks = dict[int, tuple[weakref.ref[torch.Tensor], "_Remade | _Derived"]]
_MARKED: contextvars.ContextVar[_Marks | None] = contextvars.ContextVar("lean_saves_marked", default=None)
"""Inside :func:`lean_saves`, the tensors marked so far (by ``id``, with a weak reference that tells a live
tensor from a later one at the same address); None outside."""


class _Remade:
    """What a marked tensor's saves hold instead of it: the recipe, and its result once it has run."""

    def __init__(self, make: Callable[[], torch.Tensor]) -> None:
        self.make: Callable[[], torch.Tensor] | None = make
        self.value: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.value is None:
            assert self.make is not None
            with torch.no_grad():
                self.value = self.make()
            self.make = None
        return self.value


class _Derived:
    """A save of a tensor computed from a marked one (a bf16 rounding of it): made from the marked tensor's
    result when asked for."""

    def __init__(self, source: _Remade, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.source = source
        self.fn = fn

    def get(self) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(self.source.get())


def _entry(t: torch.Tensor) -> _Remade | _Derived | None:
    """What replaces ``t`` in saves: its entry if ``t`` itself is marked (not a dead tensor at its address)."""
    marked = _MARKED.get()
    entry = marked.get(id(t)) if marked is not None else None
    return entry[1] if entry is not None and entry[0]() is t else None


def _pack(t: torch.Tensor) -> Any:
    entry = _entry(t)
    return t if entry is None else entry


def _unpack(saved: Any) -> torch.Tensor:
    return saved.get() if isinstance(saved, (_Remade, _Derived)) else saved


@contextlib.contextmanager
def lean_saves() -> Iterator[None]:
    """Tensors marked inside with :func:`remade` are remade in the backward pass instead of kept. Not for use
    inside ``torch.utils.checkpoint``, whose own hooks it would replace."""
    token = _MARKED.set({})
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _MARKED.reset(token)


def remade(t: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Mark ``t``, just computed, as one that ``make()`` computes again exactly (from tensors autograd keeps
    anyway); returns ``t``. Outside :func:`lean_saves` or without gradients, nothing is marked."""
    marked = _MARKED.get()
    if marked is not None and torch.is_grad_enabled():
        marked[id(t)] = (weakref.ref(t), _Remade(make))
    return t


def derived(t: torch.Tensor, source: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Where ``source`` is marked, mark ``t = fn(source)`` as made from it; returns ``t``."""
    entry, marked = _entry(source), _MARKED.get()
    if marked is not None and isinstance(entry, _Remade):
        marked[id(t)] = (weakref.ref(t), _Derived(entry, fn))
    return t
