"""Completions with token ids, sampling logprobs and an explicit group id (one group = one prompt)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    loss_mask: list[float] | None = None
    """Per completion token, 1 where the policy wrote it (a forced prefix included) and 0 where an environment
    did, e.g. a tool's output (None: all the policy's)."""
    info: dict[str, Any] = field(default_factory=dict)
    """What the rollout learned on the way, e.g. ``tool_calls`` and ``final_tool_error`` of a tool episode."""
    labels: dict[str, str] = field(default_factory=dict)
    """What the rollout strategy says about this sample (e.g. ``mode``, ``template``): rewards, estimators, metrics
    and the report may read them."""
    step_rewards: dict[int, float] = field(default_factory=dict)
    """Rewards given during the rollout (e.g. by an environment), keyed by the completion token they land on."""

    @property
    def length(self) -> int:
        return len(self.completion_ids)

    @property
    def trained_mask(self) -> list[float]:
        """The loss mask, all ones when the policy wrote every token."""
        return self.loss_mask if self.loss_mask is not None else [1.0] * len(self.completion_ids)


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
