"""Completions with token ids, sampling logprobs and an explicit group id (one group = one prompt)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from incentive.data.example import Example


@dataclass
class Completion:
    """One sampled completion of one prompt. ``group_id`` ties the G samples of a prompt together."""

    group_id: int
    example: Example
    prompt_text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.completion_ids)


@dataclass
class RolloutBatch:
    """A batch of completions, any number of groups, in any order."""

    completions: list[Completion]

    def __len__(self) -> int:
        return len(self.completions)

    def __iter__(self) -> Iterator[Completion]:
        return iter(self.completions)

    @property
    def group_ids(self) -> list[int]:
        return [c.group_id for c in self.completions]

    def groups(self) -> dict[int, list[int]]:
        """group id → indices of its completions, in batch order."""
        return group_indices(self.group_ids)


def group_indices(group_ids: Sequence[int]) -> dict[int, list[int]]:
    """group id → positions of that id in ``group_ids``; groups may be interleaved or out of order."""
    out: dict[int, list[int]] = {}
    for i, gid in enumerate(group_ids):
        out.setdefault(gid, []).append(i)
    return out
