"""Advantage estimators by name: scores of a batch + explicit group ids (+ the examples, for estimators that
weigh by domain or difficulty) → one advantage per completion.

Failed samples (non-finite score) take no part in their group's statistics and get advantage 0; the trainer
also masks them out of the loss.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch

from incentive.config import ConfigError
from incentive.data.example import Example
from incentive.registry import Registry
from incentive.rollout.types import group_indices


class AdvantageEstimator(ABC):
    """Group-relative advantage: subclasses say how one group's valid scores become advantages."""

    scale_invariant: ClassVar[bool] = False
    """True when multiplying a group's scores by a constant leaves its advantages unchanged (std normalisation)."""

    min_group_size: ClassVar[int] = 2
    """Completions per prompt (generation.num_generations) below which every advantage is 0: a group-relative
    estimator compares each completion with the others of its group, and a lone one has none."""

    def fit(self, examples: Sequence[Example]) -> None:
        """See the training set once before RL (e.g. to count domain shares); most estimators need nothing."""
        return None

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


ADVANTAGES: Registry[type[AdvantageEstimator]] = Registry("advantage estimator")


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
