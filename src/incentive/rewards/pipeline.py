"""Runs the recipe's reward parts over a batch: weighted sum, per-component scores, failures with reasons."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from incentive.config import ConfigError, RewardConfig
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch


@dataclass
class Scored:
    """Total reward per completion (NaN where any part failed) and what went into it; ``failed_parts[i]`` names
    each part that failed completion i, with its reason."""

    total: list[float]
    components: dict[str, list[float]]
    extras: dict[str, list[float]]
    failed_parts: list[list[str]] = field(default_factory=list)
    reasons: list[list[str]] = field(default_factory=list)

    @property
    def failed(self) -> list[bool]:
        return [not math.isfinite(t) for t in self.total]

    @property
    def failures(self) -> Counter[str]:
        """How often each "part: reason" failure occurred."""
        return Counter(key for keys in self.failed_parts for key in keys)

    def select(self, indices: Sequence[int]) -> Scored:
        """The scores of some completions, in the given order."""
        return Scored(
            [self.total[i] for i in indices],
            {k: [v[i] for i in indices] for k, v in self.components.items()},
            {k: [v[i] for i in indices] for k, v in self.extras.items()},
            [self.failed_parts[i] for i in indices],
            [self.reasons[i] for i in indices],
        )

    @staticmethod
    def concat(parts: Sequence[Scored]) -> Scored:
        """Scores of batches scored by the same pipeline, one after the other."""

        def join(key: str) -> dict[str, list[float]]:
            names = {name for part in parts for name in getattr(part, key)}
            return {name: [x for part in parts for x in getattr(part, key)[name]] for name in names}

        return Scored(
            [t for part in parts for t in part.total],
            join("components"),
            join("extras"),
            [f for part in parts for f in part.failed_parts],
            [r for part in parts for r in part.reasons],
        )


class RewardPipeline:
    """The weighted parts of a recipe; a part that raises or returns garbage fails only its samples."""

    def __init__(self, configs: list[RewardConfig]) -> None:
        if not configs:
            raise ConfigError("a recipe needs at least one reward")
        self.parts: list[tuple[str, float, Reward]] = []
        seen: set[str] = set()
        for cfg in configs:
            if cfg.name in seen:
                raise ConfigError(f"reward '{cfg.name}' is listed twice")
            seen.add(cfg.name)
            try:
                part = REWARDS.get(cfg.name)(**cfg.args)
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(f"reward '{cfg.name}': {err}") from err
            self.parts.append((cfg.name, cfg.weight, part))

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> Scored:
        n = len(batch)
        total = [0.0] * n
        reasons: list[list[str]] = [[] for _ in range(n)]
        failed_parts: list[list[str]] = [[] for _ in range(n)]
        components: dict[str, list[float]] = {}
        extras: dict[str, list[float]] = {}
        for name, weight, part in self.parts:
            result = self._run(name, part, batch, ctx)
            components[name] = result.scores
            for key, values in result.extras.items():
                extras[f"{name}/{key}"] = values
            for i, (score, reason) in enumerate(zip(result.scores, result.reasons, strict=True)):
                if reason is not None:
                    reasons[i].append(f"{name}: {reason}")
                if math.isfinite(score):
                    total[i] += weight * score
                else:
                    total[i] = math.nan
                    failed_parts[i].append(f"{name}: {reason or 'non-finite score'}")
        return Scored(total, components, extras, failed_parts, reasons)

    @staticmethod
    def _run(name: str, part: Reward, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        n = len(batch)
        try:
            result = part(batch, ctx)
        except Exception as err:  # a failing reward fails its samples, not the run
            return RewardResult([math.nan] * n, [f"raised {type(err).__name__}: {err}"] * n)
        if len(result.scores) != n or len(result.reasons) != n:
            return RewardResult(
                [math.nan] * n, [f"returned {len(result.scores)} scores for {n} completions"] * n
            )
        scores = [float(s) for s in result.scores]
        reasons = [
            r if math.isfinite(s) or r is not None else "non-finite score"
            for s, r in zip(scores, result.reasons, strict=True)
        ]
        return RewardResult(scores, reasons, result.extras)
