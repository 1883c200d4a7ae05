"""Policy losses by name (clipped, dual_clip, gspo, cispo), the KL to a reference (a loss term or folded into
the advantage) and the aggregation over tokens.

Aggregation denominators are batch-wide (passed in), so splitting a batch into micro-batches for gradient
accumulation gives exactly the gradient of the whole batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from incentive.registry import Registry

if TYPE_CHECKING:
    from incentive.config import LossConfig

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


@dataclass(frozen=True, kw_only=True)
class PolicyLoss(ABC):
    """What every policy loss shares: the KL to the reference, as a loss term or folded into the advantage, and
    the aggregation over tokens; a subclass supplies the per-token surrogate."""

    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    aggregation: str = "token-mean"
    constant: float = 1.0

    @abstractmethod
    def surrogate(
        self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The per-token loss [B, T] before any KL term and aggregation, and its detached stats."""

    def __call__(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        totals: Totals,
        ref_logp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """logp/old_logp/ref_logp/mask: [B, T]; advantages: [B, T], or [B] for one per completion. Returns the
        aggregated loss and detached stats.

        KL in the loss adds β·kl(logp, ref) per token, with its gradient. KL in the reward subtracts
        β·kl(old_logp, ref) per token from the advantage, detached: PPO-RLHF's per-token reward −β·KL, applied to
        each token's own advantage (no sum over later tokens, as an estimator that gives each token its return
        would do)."""
        mask = mask.to(logp.dtype)
        adv = per_token(advantages, logp)
        kl: torch.Tensor | None = None
        if self.beta > 0:
            if ref_logp is None:
                raise ValueError("a KL penalty (beta > 0) needs reference logprobs")
            estimator = KL_ESTIMATORS.get(self.kl_estimator)
            if self.kl_in_reward:
                with torch.no_grad():
                    kl = estimator(old_logp, ref_logp)
                adv = adv - self.beta * kl
            else:
                kl = estimator(logp, ref_logp)
        per_token_loss, stats = self.surrogate(logp, old_logp, adv, mask)
        if kl is not None:
            if not self.kl_in_reward:
                per_token_loss = per_token_loss + self.beta * kl
            stats["kl"] = masked_mean(kl, mask)
        aggregate = AGGREGATIONS.get(self.aggregation)
        return aggregate(per_token_loss, mask, totals, self.constant), stats


def per_token(advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Advantages as [B, T] in logp's dtype: one per completion ([B]) is repeated over its tokens."""
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    if adv.shape != logp.shape:
        raise ValueError(
            f"advantages of shape {tuple(advantages.shape)} fit no logprobs of {tuple(logp.shape)}"
        )
    return adv


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` over the tokens ``mask`` keeps, for stats."""
    with torch.no_grad():
        return float((values * mask).sum() / mask.sum().clamp(min=1))


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss per token, ½·max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²): the critic may not gain
    by moving a value more than ε from the one the advantages used. Returns the loss and, as 0/1, where the
    clipped term is the larger (the clip fraction's numerator); with ``clip`` None, ½(V − R)² and zeros."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(values)
    moved = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (moved - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).to(values.dtype).detach()


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """−min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A) per token, with the clipped share and the mean ratio."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    stats = {
        "clip_frac": masked_mean((clipped < unclipped).to(mask.dtype), mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    return -torch.minimum(unclipped, clipped), stats


POLICY_LOSSES: Registry[type[PolicyLoss]] = Registry("policy loss")


@POLICY_LOSSES.register("clipped")
@dataclass(frozen=True, kw_only=True)
class Clipped(PolicyLoss):
    """PPO's clipped surrogate with separate bounds (DAPO's clip-higher): −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A),
    ρ = exp(logp − old_logp) per token."""

    eps_low: float = 0.2
    eps_high: float = 0.28

    def surrogate(
        self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return clipped_surrogate(torch.exp(logp - old_logp), advantages, self.eps_low, self.eps_high, mask)


@POLICY_LOSSES.register("dual_clip")
@dataclass(frozen=True, kw_only=True)
class DualClip(Clipped):
    """Dual-clip PPO (Ye et al., 2020): where A < 0 the clipped surrogate's loss is also capped at −c·A, so a
    token whose ratio grew far past 1 + ε_high (ρ > c) cannot push the loss without bound:
    loss = min(−min(ρA, clip(ρ)A), −cA) for A < 0, the clipped loss otherwise."""

    clip_ratio_c: float = 3.0

    def surrogate(
        self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = super().surrogate(logp, old_logp, advantages, mask)
        cap = -self.clip_ratio_c * advantages
        capped = (advantages < 0) & (cap < loss)
        stats["dual_clip_frac"] = masked_mean(capped.to(mask.dtype), mask)
        return torch.where(capped, cap, loss), stats


@POLICY_LOSSES.register("gspo")
@dataclass(frozen=True, kw_only=True)
class GSPO(PolicyLoss):
    """GSPO (Zheng et al., 2025), token form: one importance ratio per sequence,
    s = exp(mean over its tokens of (logp − old_logp)), clipped to [1 − ε_low, 1 + ε_high] (about 1e-4 wide);
    per token s_t = sg[s]·exp(logp_t − sg[logp_t]) (value s, gradient s per token) and the loss is
    −min(s_t·A_t, clip(s_t)·A_t). With seq-mean-token-mean aggregation this is the paper's objective."""

    gspo_eps_low: float = 3e-4
    gspo_eps_high: float = 4e-4

    def surrogate(
        self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        log_seq = ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        ratio = torch.exp(log_seq.detach()[:, None] + logp - logp.detach())
        return clipped_surrogate(ratio, advantages, self.gspo_eps_low, self.gspo_eps_high, mask)


@POLICY_LOSSES.register("cispo")
@dataclass(frozen=True, kw_only=True)
class CISPO(PolicyLoss):
    """CISPO (MiniMax-M1, 2025): −sg[clip(ρ, 1 − ε_low, 1 + ε_high)]·A·logp per token. The clipped ratio is only
    a weight, so every token keeps a gradient (−weight·A), clipped or not. Defaults: no lower bound (ε_low = 1),
    as in the paper, and weights capped at 4."""

    cispo_eps_low: float = 1.0
    cispo_eps_high: float = 3.0

    def surrogate(
        self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            ratio = torch.exp(logp - old_logp)
            weight = torch.clamp(ratio, 1 - self.cispo_eps_low, 1 + self.cispo_eps_high)
        stats = {
            "clip_frac": masked_mean((weight != ratio).to(mask.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        return -weight * advantages * logp, stats


SHARED = frozenset(f.name for f in fields(PolicyLoss))
"""The fields every policy loss has; the rest of a loss's fields are its own recipe keys."""


def own_keys(loss: type[PolicyLoss]) -> list[str]:
    """The recipe keys (``loss.<key>``) a loss reads beyond the shared ones: its own dataclass fields."""
    return [f.name for f in fields(loss) if f.name not in SHARED]


def build_policy_loss(cfg: LossConfig, default_constant: float) -> PolicyLoss:
    """The recipe's loss: the class ``cfg.name`` registers, given the shared settings and the config keys named
    like its own fields (a field the config lacks keeps its default); ``default_constant`` stands in for an
    unset ``constant_normaliser``."""
    loss = POLICY_LOSSES.get(cfg.name)
    own = {key: getattr(cfg, key) for key in own_keys(loss) if key in type(cfg).model_fields}
    return loss(
        beta=cfg.kl_beta,
        kl_estimator=cfg.kl_estimator,
        kl_in_reward=cfg.kl_in_reward,
        aggregation=cfg.aggregation,
        constant=cfg.constant_normaliser or default_constant,
        **own,
    )
