"""Policy loss: clipped surrogate with separate low/high clip, optional KL penalty, and aggregation modes.

Aggregation denominators are batch-wide (passed in), so splitting a batch into micro-batches for gradient
accumulation gives exactly the gradient of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from incentive.registry import Registry

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """log π − log π_ref: unbiased, can be negative per token."""
    return logp - ref


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """½ (log π − log π_ref)²."""
    return 0.5 * (logp - ref) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """exp(ref − logπ) − (ref − logπ) − 1: unbiased and non-negative (Schulman's estimator)."""
    diff = ref - logp
    return torch.exp(diff) - diff - 1


@dataclass(frozen=True)
class Totals:
    """Batch-wide sizes the aggregation divides by."""

    tokens: int
    sequences: int


Aggregation = Callable[[torch.Tensor, torch.Tensor, Totals, float], torch.Tensor]
AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")


@AGGREGATIONS.register("token-mean")
def token_mean(loss: torch.Tensor, mask: torch.Tensor, totals: Totals, constant: float) -> torch.Tensor:
    """Σ loss over all tokens of the batch / number of tokens (DAPO): long answers weigh more."""
    return (loss * mask).sum() / max(totals.tokens, 1)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(
    loss: torch.Tensor, mask: torch.Tensor, totals: Totals, constant: float
) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (original GRPO)."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / max(totals.sequences, 1)


@AGGREGATIONS.register("constant")
def constant_normaliser(
    loss: torch.Tensor, mask: torch.Tensor, totals: Totals, constant: float
) -> torch.Tensor:
    """Σ loss / (sequences × a constant, e.g. the max completion length): Dr.GRPO, GUI-G1; no length bias."""
    return (loss * mask).sum() / (max(totals.sequences, 1) * constant)


@dataclass(frozen=True)
class PolicyLoss:
    """−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) + β·KL, aggregated by name."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"
    constant: float = 1.0

    def __call__(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        totals: Totals,
        ref_logp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """logp/old_logp/ref_logp/mask: [B, T]; advantages: [B]. Returns the loss and detached stats."""
        mask = mask.to(logp.dtype)
        ratio = torch.exp(logp - old_logp)
        adv = advantages[:, None].to(logp.dtype)
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, 1 - self.eps_low, 1 + self.eps_high) * adv
        per_token = -torch.minimum(unclipped, clipped)
        stats: dict[str, float] = {}
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            stats["clip_frac"] = float(((clipped < unclipped).to(mask.dtype) * mask).sum() / n)
            stats["ratio_mean"] = float((ratio * mask).sum() / n)
        if self.beta > 0:
            if ref_logp is None:
                raise ValueError("a KL penalty (beta > 0) needs reference logprobs")
            kl = KL_ESTIMATORS.get(self.kl_estimator)(logp, ref_logp)
            per_token = per_token + self.beta * kl
            with torch.no_grad():
                stats["kl"] = float((kl * mask).sum() / mask.sum().clamp(min=1))
        aggregate = AGGREGATIONS.get(self.aggregation)
        return aggregate(per_token, mask, totals, self.constant), stats
