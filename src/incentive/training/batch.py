"""A step's training batch: per completion, the token ids the update runs on and the per-token quantities that the
advantage estimator, the policy loss and the critic read (loss mask, advantages, old and reference logprobs,
values, returns, step rewards), as [B, T] tensors right-padded with zeros."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from incentive.data.example import Example
from incentive.rollout.types import RolloutBatch


def pad(rows: Sequence[torch.Tensor | Sequence[float]], width: int) -> torch.Tensor:
    """Right-pad 1-D rows with zeros into a [len(rows), width] tensor (keeps autograd for tensor rows)."""
    out = []
    for row in rows:
        t = row if isinstance(row, torch.Tensor) else torch.tensor(row, dtype=torch.float32)
        out.append(torch.nn.functional.pad(t, (0, width - t.shape[0])))
    return torch.stack(out)


@dataclass
class TrainingBatch:
    """Row i is completion i of the step's rollouts, in their order. ``mask`` is 1 on the tokens the policy wrote
    (tool, environment and observation tokens are 0); ``trained`` says which rows the update may use at all (not
    failed by the rewards, not empty, not a truncation that ``rl.mask_truncated`` leaves out). The optional
    tensors are filled as the step goes: what the estimator declares it ``needs`` before it runs, its advantages
    after, old and reference logprobs for the rows the update trains on."""

    contexts: list[list[int]]
    targets: list[list[int]]
    mask: torch.Tensor
    """[B, T] float32: the loss mask."""
    scores: torch.Tensor
    """[B] float64: each completion's total reward, NaN where a reward part failed it."""
    group_ids: list[int]
    examples: list[Example]
    labels: list[dict[str, str]]
    trained: list[bool]
    masked_truncated: int = 0
    """Rows left out because they were cut at ``max_new_tokens`` (with ``rl.mask_truncated``)."""
    step_rewards: list[dict[int, float]] | None = None
    """Rewards given during the rollout, keyed by completion token (for estimators that need them)."""
    values: torch.Tensor | None = None
    """[B, T]: the critic's V(s_t) before token t, on trained rows."""
    reference_logprobs: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    """[B, T] float32: per-token advantages; a sequence-level estimator's are repeated over each row's tokens."""
    sequence_advantages: torch.Tensor | None = None
    """[B]: one advantage per completion, for the logs (a token-level estimator's mean over the policy's tokens)."""
    returns: torch.Tensor | None = None
    """[B, T]: the critic's targets, written by an estimator that reads values."""

    @classmethod
    def from_rollouts(
        cls, batch: RolloutBatch, scores: Sequence[float], mask_truncated: bool
    ) -> TrainingBatch:
        """The batch of a step's scored rollouts."""
        comps = batch.completions
        width = max((c.length for c in comps), default=0)
        usable = [c.length > 0 and math.isfinite(s) for c, s in zip(comps, scores, strict=True)]
        cut = [ok and mask_truncated and c.truncated for ok, c in zip(usable, comps, strict=True)]
        return cls(
            contexts=[c.prompt_ids for c in comps],
            targets=[c.completion_ids for c in comps],
            mask=pad([c.trained_mask for c in comps], width),
            scores=torch.tensor(list(scores), dtype=torch.float64),
            group_ids=batch.group_ids,
            examples=[c.example for c in comps],
            labels=[c.labels for c in comps],
            trained=[ok and not c for ok, c in zip(usable, cut, strict=True)],
            masked_truncated=sum(cut),
        )

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def trained_rows(self) -> list[int]:
        return [i for i, ok in enumerate(self.trained) if ok]

    @property
    def trained_mask(self) -> torch.Tensor:
        """[B, T]: the loss mask on trained rows, 0 on the others."""
        return self.mask * torch.tensor(self.trained, dtype=self.mask.dtype)[:, None]

    def scatter(self, rows: Sequence[int], values: Sequence[torch.Tensor | Sequence[float]]) -> torch.Tensor:
        """A [B, T] float32 tensor holding ``values[k]`` in row ``rows[k]`` and zeros elsewhere."""
        out = torch.zeros(self.mask.shape, dtype=torch.float32)
        for i, row in zip(rows, values, strict=True):
            t = row if isinstance(row, torch.Tensor) else torch.tensor(row, dtype=torch.float32)
            out[i, : t.shape[0]] = t
        return out

    def set_advantages(self, advantages: torch.Tensor) -> None:
        """Take an estimator's output: one advantage per completion ([B]), repeated over each row's tokens, or one
        per token ([B, T])."""
        if advantages.dim() == 1:
            lengths = torch.tensor([len(t) for t in self.targets])
            on = torch.arange(self.mask.shape[1])[None, :] < lengths[:, None]
            self.advantages = torch.where(on, advantages.float()[:, None], 0.0)
            self.sequence_advantages = advantages.float()
            return
        if advantages.shape != self.mask.shape:
            raise ValueError(
                f"advantages of shape {tuple(advantages.shape)}, batch of {tuple(self.mask.shape)}"
            )
        self.advantages = advantages.float()
        self.sequence_advantages = (self.advantages * self.mask).sum(-1) / self.mask.sum(-1).clamp(min=1)
