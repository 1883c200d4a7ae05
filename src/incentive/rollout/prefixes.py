"""The ``prefixes`` strategy: each group split among forced assistant prefixes by share (e.g. a thinking and a
non-thinking mode), each share labelled, optionally with its own sampling settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from incentive.data.example import Example
from incentive.rollout.strategy import ROLLOUT_STRATEGIES, RolloutContext, RolloutStrategy, Variant


@dataclass(frozen=True)
class PrefixShare:
    """One mode: its label, the text forced at the start of the answer, its share of the group's samples, and
    sampling settings of its own (None: the recipe's)."""

    name: str
    prefix: str = ""
    share: float = 1.0
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None


def split_counts(shares: list[float], total: int) -> list[int]:
    """``total`` samples split in proportion to ``shares`` by largest remainder (ties to the earlier share), so
    the counts sum to ``total`` and depend on nothing but the arguments."""
    whole = sum(shares)
    exact = [total * s / whole for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


@ROLLOUT_STRATEGIES.register("prefixes")
class Prefixes(RolloutStrategy):
    """``modes``: a list of ``{name, prefix, share, temperature, top_p, max_new_tokens}``; each example's G
    samples are split among them by share (a mode whose share rounds to no sample is left out of that group) and
    each completion is labelled ``{label: name}``. All modes share the example's group id unless
    ``separate_groups`` gives each its own."""

    def __init__(
        self, modes: list[dict[str, Any]], label: str = "mode", separate_groups: bool = False
    ) -> None:
        if not modes:
            raise ValueError("modes: give at least one {name, prefix, share}")
        self.modes = [PrefixShare(**mode) for mode in modes]
        names = [m.name for m in self.modes]
        if len(set(names)) != len(names):
            raise ValueError(f"modes: names must differ, got {names}")
        if any(not math.isfinite(m.share) or m.share <= 0 for m in self.modes):
            raise ValueError(
                f"modes: each share must be a positive number, got {[m.share for m in self.modes]}"
            )
        self.label = label
        self.separate_groups = separate_groups
        self.forces_prefix = any(m.prefix for m in self.modes)

    def variants(self, example: Example, ctx: RolloutContext) -> list[Variant]:
        prompt = ctx.prompt(example)
        counts = split_counts([m.share for m in self.modes], ctx.num_generations)
        return [
            Variant(
                prompt,
                n,
                prefix=mode.prefix,
                labels={self.label: mode.name},
                temperature=mode.temperature,
                top_p=mode.top_p,
                max_new_tokens=mode.max_new_tokens,
                group=mode.name if self.separate_groups else "",
            )
            for mode, n in zip(self.modes, counts, strict=True)
            if n > 0
        ]
