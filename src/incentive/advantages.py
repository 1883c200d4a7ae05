"""Advantage estimators by name: scores of a batch + explicit group ids → one advantage per completion.

Failed samples (non-finite score) take no part in their group's statistics and get advantage 0; the trainer
also masks them out of the loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from incentive.registry import Registry
from incentive.rollout.types import group_indices


class AdvantageEstimator(ABC):
    """Group-relative advantage: subclasses say how one group's valid scores become advantages."""

    def __call__(self, scores: torch.Tensor, group_ids: Sequence[int]) -> torch.Tensor:
        scores = scores.double()
        out = torch.zeros_like(scores)
        for idx in group_indices(group_ids).values():
            index = torch.tensor(idx)
            group = scores[index]
            valid = torch.isfinite(group)
            if valid.sum() == 0:
                continue
            values = torch.zeros_like(group)
            values[valid] = self.group(group[valid])
            out[index] = values
        return out.float()

    @abstractmethod
    def group(self, scores: torch.Tensor) -> torch.Tensor:
        """Advantages of one group's valid scores."""


ADVANTAGES: Registry[type[AdvantageEstimator]] = Registry("advantage estimator")


@ADVANTAGES.register("grpo")
class GRPO(AdvantageEstimator):
    """(r − mean) / (std + eps), std with Bessel's correction (as TRL and verl); a lone sample gets 0."""

    def __init__(self, eps: float = 1e-4) -> None:
        self.eps = eps

    def group(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.numel() < 2:
            return torch.zeros_like(scores)
        return (scores - scores.mean()) / (scores.std() + self.eps)


@ADVANTAGES.register("dr_grpo")
class DrGRPO(AdvantageEstimator):
    """r − mean: Dr.GRPO drops the std, which over-weights near-uniform groups."""

    def group(self, scores: torch.Tensor) -> torch.Tensor:
        return scores - scores.mean()


@ADVANTAGES.register("rloo")
class RLOO(AdvantageEstimator):
    """r_i − mean of the others (leave-one-out baseline) = G/(G−1)·(r_i − mean)."""

    def group(self, scores: torch.Tensor) -> torch.Tensor:
        n = scores.numel()
        if n < 2:
            return torch.zeros_like(scores)
        return (scores - scores.mean()) * n / (n - 1)
