"""Advantage estimators by name: a step's training batch → advantages, one per completion (sequence-level, broadcast
over its tokens by the batch) or one per token (token-level).

Sequence-level estimators compare the scores of explicit groups (+ the examples, for estimators that weigh by domain
or difficulty). Failed samples (non-finite score) take no part in their group's statistics and get advantage 0;
the trainer also masks them out of the loss. An estimator declares in ``needs`` what beyond scores it reads
(values, reference logprobs, step rewards), and the trainer supplies exactly that.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from incentive.config import ConfigError
from incentive.data.example import Example
from incentive.registry import Registry
from incentive.rollout.types import group_indices

if TYPE_CHECKING:
    from incentive.training.batch import TrainingBatch

NEEDS = frozenset({"values", "reference_logprobs", "step_rewards"})
"""What an estimator may ask the trainer for: the critic's per-token values, the reference policy's logprobs of
every trained completion, and the rollout's step rewards."""


class Estimator(ABC):
    """Any advantage estimator: the training batch → advantages, [B] (one per completion) or [B, T] (per token).
    One that reads ``values`` also writes ``batch.returns``, the critic's targets."""

    needs: ClassVar[frozenset[str]] = frozenset()
    """The batch fields beyond scores, groups and examples that :meth:`estimate` reads (a subset of NEEDS)."""

    min_group_size: ClassVar[int] = 1
    """Completions per prompt (generation.num_generations) below which every advantage would be 0."""

    scale_invariant: ClassVar[bool] = False
    """True when multiplying a group's scores by a constant leaves its advantages unchanged (std normalisation)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.needs <= NEEDS:
            raise TypeError(
                f"{cls.__name__}.needs: {sorted(cls.needs - NEEDS)} unknown; known: {sorted(NEEDS)}"
            )

    def fit(self, examples: Sequence[Example]) -> None:
        """See the training set once before RL (e.g. to count domain shares); most estimators need nothing."""
        return None

    @abstractmethod
    def estimate(self, batch: TrainingBatch) -> torch.Tensor:
        """Advantages of the batch: [B], or [B, T] on its policy-written tokens (0 elsewhere)."""


class AdvantageEstimator(Estimator):
    """Sequence-level, group-relative advantage: subclasses say how one group's valid scores become advantages."""

    min_group_size: ClassVar[int] = 2
    """A group-relative estimator compares each completion with the others of its group, and a lone one has none:
    with fewer completions per prompt every advantage is 0."""

    def estimate(self, batch: TrainingBatch) -> torch.Tensor:
        return self(batch.scores, batch.group_ids, batch.examples)

    def __call__(
        self, scores: torch.Tensor, group_ids: Sequence[int], examples: Sequence[Example] | None = None
    ) -> torch.Tensor:
        """``examples[i]`` is completion i's example; estimators that weigh by example need them."""
        scores = scores.double()
        out = torch.zeros_like(scores)
        for idx in group_indices(group_ids).values():
            index = torch.tensor(idx)
            group = scores[index]
            valid = torch.isfinite(group)
            if valid.sum() == 0:
                continue
            keep = valid.tolist()
            members = [examples[i] for i, ok in zip(idx, keep, strict=True) if ok] if examples else None
            values = torch.zeros_like(group)
            values[valid] = self.group_of(group[valid], members)
            out[index] = values
        return out.float()

    def group_of(self, scores: torch.Tensor, examples: Sequence[Example] | None) -> torch.Tensor:
        """Advantages of one group's valid scores given their examples; by default the examples are not used."""
        return self.group(scores)

    @abstractmethod
    def group(self, scores: torch.Tensor) -> torch.Tensor:
        """Advantages of one group's valid scores."""


ADVANTAGES: Registry[type[Estimator]] = Registry("advantage estimator")


@ADVANTAGES.register("grpo")
class GRPO(AdvantageEstimator):
    """(r − mean) / (std + eps), std with Bessel's correction (as TRL and verl); a lone sample gets 0."""

    scale_invariant = True

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


class WeightedEstimator(AdvantageEstimator):
    """A base estimator whose groups or samples are weighted by their examples (domain, difficulty)."""

    name: ClassVar[str]

    def __init__(self, base: str) -> None:
        cls = ADVANTAGES.get(base)
        if not issubclass(cls, AdvantageEstimator):
            raise ConfigError(
                f"advantage '{self.name}' cannot use base '{base}': it weighs the scores of a group, so its base "
                "must be a group-relative estimator (dr_grpo, the default, or rloo)"
            )
        if cls.scale_invariant:
            raise ConfigError(
                f"advantage '{self.name}' cannot use base '{base}': its std normalisation divides each group by "
                "its own spread, which cancels per-group weights exactly (a silent no-op). Use base: dr_grpo "
                "(r − mean, the default) or rloo"
            )
        self.base = cls()

    def group(self, scores: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"advantage '{self.name}' needs each completion's example")


DomainWeight = Literal["log", "log_sq", "inv", "none"]
DOMAIN_WEIGHTS: dict[str, Callable[[float], float]] = {
    "log": lambda p: math.log(1 + 1 / p),
    "log_sq": lambda p: math.log(1 + 1 / p) ** 2,
    "inv": lambda p: 1 / p,
    "none": lambda p: 1.0,
}


@ADVANTAGES.register("disco")
class DISCO(WeightedEstimator):
    """DISCO (spec: methods/disco.md): scale a group's rewards by a domain weight from the domain's share p_d of
    the training data (log: ln(1 + 1/p_d), log_sq, inv: 1/p_d) and a self-consistency difficulty weight
    1 / (SC + ε), SC = the group's mean reward, then take the base estimator (Dr.GRPO: r − mean, no std).

    SC is a fraction correct, defined for rewards ≥ 0 (the spec's fix for negative rewards is to restrict them):
    a group with a negative reward is shifted up so its lowest reward is 0 before weighing. The shift is a no-op
    for nonnegative groups (the paper's numbers are unchanged) and continuous at 0, the base estimators are
    shift-invariant, a group scored {1, −0.5} weighs exactly as one scored {1, 0}, and the divisor is at least
    range/G, so Dr.GRPO's |A| ≤ w_dom·(G − 1), the spec's own bound for 0/1 rewards (a bare 1/(SC + ε) gave
    ~1e5 once negative rewards pushed SC to or below 0)."""

    name = "disco"

    def __init__(
        self,
        domain_weight: DomainWeight = "log",
        difficulty_weight: bool = True,
        eps: float = 1e-5,
        base: str = "dr_grpo",
        domain_shares: dict[str, float] | None = None,
    ) -> None:
        super().__init__(base)
        if domain_weight not in DOMAIN_WEIGHTS:
            raise ValueError(f"domain_weight must be one of {sorted(DOMAIN_WEIGHTS)}, got {domain_weight!r}")
        self.weigh = DOMAIN_WEIGHTS[domain_weight]
        self.difficulty_weight = difficulty_weight
        self.eps = eps
        self.shares = dict(domain_shares or {})

    def fit(self, examples: Sequence[Example]) -> None:
        """p_d from the training set, unless the recipe gave the shares."""
        if not self.shares:
            counts = Counter(e.domain for e in examples)
            self.shares = {str(d): n / len(examples) for d, n in counts.items()}

    def domain_weight(self, domain: str | None) -> float:
        if str(domain) not in self.shares:
            raise ValueError(f"disco: domain {domain!r} has no training share (known: {sorted(self.shares)})")
        return self.weigh(self.shares[str(domain)])

    def group_of(self, scores: torch.Tensor, examples: Sequence[Example] | None) -> torch.Tensor:
        if not examples:
            return self.group(scores)
        weight = self.domain_weight(examples[0].domain)
        if self.difficulty_weight:
            scores = scores - min(float(scores.min()), 0.0)
            weight /= float(scores.mean()) + self.eps
        return self.base.group_of(scores * weight, examples)


@ADVANTAGES.register("difficulty_weighted")
class DifficultyWeighted(WeightedEstimator):
    """GUI-G1's per-question weight w_q: the base estimator's advantages times the example's ``difficulty``
    (1 when absent). With a clipped surrogate, w·min(ρA, clip(ρ)A) = min(ρwA, clip(ρ)wA) for w ≥ 0, so this is
    exactly the paper's weighted loss (with no KL term, as in GUI-G1)."""

    name = "difficulty_weighted"

    def __init__(self, base: str = "dr_grpo", default: float = 1.0) -> None:
        super().__init__(base)
        self.default = default

    def group_of(self, scores: torch.Tensor, examples: Sequence[Example] | None) -> torch.Tensor:
        if not examples:
            return self.group(scores)
        weights = [self.default if e.difficulty is None else e.difficulty for e in examples]
        if any(w < 0 for w in weights):
            raise ValueError(f"difficulty weights must be ≥ 0, got {weights}")
        return self.base.group_of(scores, examples) * torch.tensor(weights, dtype=scores.dtype)


def token_rewards(batch: TrainingBatch) -> torch.Tensor:
    """[B, T] float64 rewards per token of the trained rows: the completion's score on its last policy-written
    token, plus its step rewards. Masked (tool, environment) tokens get none: a step reward keyed to one goes to
    the last policy-written token before it (the action it answers), or the first after it where none is before."""
    out = torch.zeros(batch.mask.shape, dtype=torch.float64)
    steps = batch.step_rewards or [{} for _ in range(len(batch))]
    for i in batch.trained_rows:
        policy = batch.mask[i].nonzero().flatten().tolist()
        if not policy:
            continue
        out[i, policy[-1]] += float(batch.scores[i])
        for token, reward in steps[i].items():
            if not 0 <= token < len(batch.targets[i]):
                raise ValueError(
                    f"a step reward lands on token {token} of a completion of {len(batch.targets[i])} tokens"
                )
            before = [t for t in policy if t <= token]
            out[i, before[-1] if before else policy[0]] += reward
    return out


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's tokens where ``mask`` is 1, in float64: from the last one
    back, δ_k = r_k + γ·V_{k+1} − V_k and A_k = δ_k + γλ·A_{k+1}, with V = 0 past the last token; returns
    R_k = A_k + V_k. Tokens where ``mask`` is 0 are skipped, not stepped through: the recursion runs over the
    policy's tokens only, so the value bootstraps across a masked observation span (γ counts the policy's
    tokens). Skipped tokens get advantage and return 0. Returns (advantages, returns), both [B, T]."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    ret = torch.zeros(rewards.shape, dtype=torch.float64)
    r, v = rewards.double().tolist(), values.double().tolist()
    for i in range(rewards.shape[0]):
        running = next_value = 0.0
        for t in reversed(mask[i].nonzero().flatten().tolist()):
            running = r[i][t] + gamma * next_value - v[i][t] + gamma * lam * running
            adv[i, t] = running
            ret[i, t] = running + v[i][t]
            next_value = v[i][t]
    return adv, ret


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the tokens where ``mask`` is 1 (population variance); 0 elsewhere."""
    n = mask.sum()
    if n < 2:
        return values * mask
    mean = (values * mask).sum() / n
    var = (((values - mean) * mask) ** 2).sum() / n
    return (values - mean) * torch.rsqrt(var + eps) * mask


@ADVANTAGES.register("gae")
class GAE(Estimator):
    """PPO's token-level advantage with a critic: per-token rewards (the score on the last policy-written token,
    step rewards where the rollout gave them; see :func:`token_rewards`), GAE(γ, λ) over the policy-written tokens
    with the critic's values (masked observation spans are skipped, see :func:`gae`), and, with ``whiten``, the
    advantages normalised over all the batch's policy tokens. The returns become the critic's targets."""

    needs = frozenset({"values", "step_rewards"})

    def __init__(self, gamma: float = 1.0, lam: float = 0.95, whiten: bool = True) -> None:
        if not (0 <= gamma <= 1 and 0 <= lam <= 1):
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
        self.gamma = gamma
        self.lam = lam
        self.whiten = whiten

    def estimate(self, batch: TrainingBatch) -> torch.Tensor:
        if batch.values is None:
            raise ValueError("advantage 'gae' needs the critic's values (a recipe's critic section)")
        mask = batch.trained_mask.double()
        adv, returns = gae(token_rewards(batch), batch.values, mask, self.gamma, self.lam)
        batch.returns = returns.float()
        return (masked_whiten(adv, mask) if self.whiten else adv).float()
