"""Runs the recipe's reward parts over a batch: weighted sum, per-component scores, failures with reasons."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Set
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from incentive.config import ConfigError, RewardConfig
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch
from incentive.training.signals import Deadline, TimeLimitExceeded, time_limit


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
    """The weighted parts of a recipe, each keyed by its id (default: its name) in scores, metrics and reasons; a
    part that raises, overruns its ``timeout_s`` or returns garbage fails only its samples, and so does a rollout
    that failed (``info["failure"]``, e.g. an environment that raised)."""

    def __init__(self, configs: list[RewardConfig]) -> None:
        if not configs:
            raise ConfigError("a recipe needs at least one reward")
        self.parts: list[tuple[str, float, Reward]] = []
        self.timeouts: dict[str, float] = {}
        seen: dict[str, int] = {}
        for i, cfg in enumerate(configs):
            if cfg.key in seen:
                raise ConfigError(_listed_twice(configs, seen[cfg.key], i))
            seen[cfg.key] = i
            try:
                part = REWARDS.get(cfg.name)(**cfg.args)
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(f"reward '{cfg.key}': {err}") from err
            self.parts.append((cfg.key, cfg.weight, part))
            self.timeouts[cfg.key] = cfg.timeout_s

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> Scored:
        n = len(batch)
        total = [0.0] * n
        reasons: list[list[str]] = [[] for _ in range(n)]
        failed_parts: list[list[str]] = [[] for _ in range(n)]
        components: dict[str, list[float]] = {}
        extras: dict[str, list[float]] = {}
        for name, weight, part in self.parts:
            result = self._run(part, batch, ctx, self.timeouts[name])
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
        for i, completion in enumerate(batch):
            failure = completion.info.get("failure")  # the rollout failed, e.g. its environment raised
            if failure:
                total[i] = math.nan
                failed_parts[i].append(f"rollout: {failure}")
                reasons[i].append(f"rollout: {failure}")
        return Scored(total, components, extras, failed_parts, reasons)

    @staticmethod
    def _run(part: Reward, batch: RolloutBatch, ctx: RewardContext, timeout_s: float) -> RewardResult:
        n = len(batch)
        deadline = Deadline(timeout_s)
        error: Exception | None = None
        with suppress(TimeLimitExceeded), time_limit(deadline):
            try:
                result = part(batch, ctx)
            except Exception as err:  # a failing reward fails its samples, not the run
                error = err
        if deadline.expired:  # also where the part caught the time limit's exception and went on
            return _failed(n, f"timeout: no result within {timeout_s:g} s")
        if error is not None:
            return _failed(n, f"raised {type(error).__name__}: {error}")
        return _checked(result, n)


def _listed_twice(configs: list[RewardConfig], first: int, second: int) -> str:
    """Why two reward entries cannot both be used: their scores would be logged under one key."""
    a, b = configs[first], configs[second]
    where = f"rewards[{first}] and rewards[{second}]"
    if a.id is None and b.id is None:
        return (
            f"{where} are both reward '{a.name}'; to list a reward twice, give each entry its own id "
            f"(e.g. id: {a.name}_2), which names its metrics"
        )
    return f"{where} are both logged as '{a.key}'; give them different ids"


def _failed(n: int, reason: str) -> RewardResult:
    """All n samples failed, for one reason."""
    return RewardResult([math.nan] * n, [reason] * n)


def _checked(result: object, n: int) -> RewardResult:
    """``result`` as a RewardResult of n float scores, n reasons (str or None) and extras of n floats each.
    Garbage fails the samples it concerns, saying what was wrong: a bad score its own sample, a bad type or
    length all of them."""
    if not isinstance(result, RewardResult):
        return _failed(n, f"returned {type(result).__name__}, expected RewardResult")
    columns = {"scores": result.scores, "reasons": result.reasons}
    if not isinstance(result.extras, Mapping):
        return _failed(n, f"returned extras as {type(result.extras).__name__}, expected a dict")
    columns.update({f"extras[{key!r}]": values for key, values in result.extras.items()})
    lists: dict[str, list[Any]] = {}
    for name, values in columns.items():
        try:
            if isinstance(values, str | bytes | Mapping | Set) or not isinstance(values, Iterable):
                raise TypeError
            lists[name] = list(values)
        except TypeError:
            return _failed(n, f"returned {name} as {type(values).__name__}, expected a list")
        if len(lists[name]) != n:
            return _failed(n, f"returned {len(lists[name])} {name} for {n} completions")
    scores: list[float] = []
    reasons: list[str | None] = []
    for score, reason in zip(lists.pop("scores"), lists.pop("reasons"), strict=True):
        value = _number(score)
        if value is None:
            value, reason = math.nan, f"returned score {score!r}, expected a number"
        elif reason is None and not math.isfinite(value):
            reason = "non-finite score"
        scores.append(value)
        reasons.append(None if reason is None else str(reason))
    extras = {
        str(key): [math.nan if (x := _number(v)) is None else x for v in lists[f"extras[{key!r}]"]]
        for key in result.extras
    }
    return RewardResult(scores, reasons, extras)


def _number(x: object) -> float | None:
    """``x`` as a float where it is a number (bool, int, float, a NumPy or one-element tensor value), else None."""
    if x is None or isinstance(x, str | bytes):
        return None
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
