"""Which tensors and layers the subspace analysis reads: a name pattern, decoder layers (indices or a
fractional depth range), whether vectors count, and the groups overlaps are measured on (each tensor, or each
layer's tensors that share a column count, their rows stacked)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from incentive.analysis.subspace_errors import SubspaceError

LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
"""A decoder layer's index in a tensor name (``model.layers.3.mlp.up_proj.weight`` → 3)."""


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, None for the rest (embeddings, final norm, LM head)."""
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def module_of(name: str) -> str:
    """A tensor's name with its layer prefix cut (``model.layers.3.mlp.up_proj.weight`` →
    ``mlp.up_proj.weight``), so one kind of tensor can be averaged over layers."""
    match = LAYER.search(name)
    return name[match.end() :] if match else name


def parse_layers(spec: str, count: int, flag: str = "--layers", hidden_states: bool = False) -> list[int]:
    """Layer indices from ``spec``: indices and inclusive ranges (``0,3,5-7``), or a depth range in fractions
    of the ``count`` layers (``0.65-0.9``: floor(0.65·count) up to, not including, floor(0.9·count); at least
    one). ``hidden_states``: indices of a model's hidden states, 0 (the embeddings) to ``count`` (the last
    layer's)."""
    text = spec.replace(" ", "")
    if "." in text:
        return _fraction_range(text, count, flag)
    count += 1 if hidden_states else 0
    indices: set[int] = set()
    for part in filter(None, text.split(",")):
        bounds = part.split("-")
        if len(bounds) > 2 or not all(b.isdigit() for b in bounds):
            raise SubspaceError(f"{flag} {spec}: expected indices like 0,3,5-7 or fractions like 0.65-0.9")
        low, high = int(bounds[0]), int(bounds[-1])
        if low > high or high >= count:
            raise SubspaceError(f"{flag} {spec}: {part} is not a range within 0-{count - 1}")
        indices.update(range(low, high + 1))
    if not indices:
        raise SubspaceError(f"{flag} {spec}: names no layer")
    return sorted(indices)


def _fraction_range(text: str, count: int, flag: str) -> list[int]:
    bounds = text.split("-")
    try:
        low, high = (float(bounds[0]), float(bounds[-1]))
    except ValueError:
        low = high = math.nan
    if len(bounds) > 2 or not 0 <= low <= high <= 1:
        raise SubspaceError(f"{flag} {text}: expected a fraction range like 0.65-0.9 within 0-1")
    start = min(math.floor(low * count), count - 1)
    stop = max(math.floor(high * count), start + 1)
    return list(range(start, min(stop, count)))


@dataclass(frozen=True)
class Selection:
    """Which tensors to read: names matching ``pattern`` (a regular expression, searched), in ``layers``
    (None: any tensor, layered or not), floating point, and for overlaps of at least two dimensions unless
    ``vectors``."""

    pattern: str | None = None
    layers: frozenset[int] | None = None
    vectors: bool = False

    def __post_init__(self) -> None:
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise SubspaceError(f"--tensors {self.pattern}: not a regular expression ({err})") from err

    def wants(self, name: str, shape: tuple[int, ...], is_float: bool, overlap: bool = True) -> bool:
        """Whether tensor ``name`` of ``shape`` is analysed (``overlap``: for subspace overlap, where vectors
        need ``vectors``)."""
        if not is_float or len(shape) == 0:
            return False
        if overlap and len(shape) == 1 and not self.vectors:
            return False
        if self.pattern is not None and not re.search(self.pattern, name):
            return False
        return self.layers is None or layer_of(name) in self.layers


@dataclass(frozen=True)
class Group:
    """The tensors one overlap is measured on: one tensor, or a layer's tensors of one column count, whose 2-D
    views are stacked by rows."""

    name: str
    members: tuple[str, ...]
    layer: int | None
    module: str


def groups(shapes: Mapping[str, tuple[int, ...]], names: list[str], granularity: str) -> list[Group]:
    """The groups of ``names`` (in order) at ``granularity`` ``tensor`` or ``layer``."""
    if granularity == "tensor":
        return [Group(n, (n,), layer_of(n), module_of(n)) for n in names]
    if granularity != "layer":
        raise ValueError(f"granularity must be tensor or layer, got {granularity!r}")
    stacked: dict[tuple[str, int], list[str]] = {}
    single: list[Group] = []
    for name in names:
        match = LAYER.search(name)
        if match is None:
            single.append(Group(name, (name,), None, name))
            continue
        prefix = name[: match.end() - 1]
        shape = shapes[name]
        columns = math.prod(shape[1:]) if len(shape) > 1 else 1
        stacked.setdefault((prefix, columns), []).append(name)
    layered = [
        Group(f"{prefix} ({columns} columns)", tuple(members), layer_of(members[0]), f"({columns} columns)")
        for (prefix, columns), members in stacked.items()
    ]
    return layered + single
