"""Hints and their sources: a scenario code, the direction of each critical agent and the critic weights, from a
source registered by name (none, a rule oracle, a deliberately noisy oracle, or a language model in lm_hints)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from incentive.control.config import HintConfig
from incentive.control.scene import LANE_WIDTH, Scene, nearby, sector, time_to_collision
from incentive.registry import Registry

ROADS = ("straight", "merge", "intersection", "roundabout")
DENSITIES = ("low", "medium", "high")
RISKS = ("low", "medium", "high")
MANOEUVRES = ("keep", "speed_up", "slow_down", "change_left", "change_right")
CATEGORIES = {"road": ROADS, "density": DENSITIES, "risk": RISKS, "manoeuvre": MANOEUVRES}
"""The four dimensions of the scenario vector and the categories of each, in order."""

RISK_WEIGHTS = {"low": (0.2, 0.6, 0.2), "medium": (0.5, 0.35, 0.15), "high": (0.7, 0.2, 0.1)}
"""The oracle's (safety, efficiency, comfort) critic weights per risk level."""

ROAD_OF_SCENARIO = {"merge-v0": "merge", "intersection-v0": "intersection", "roundabout-v0": "roundabout"}
"""highway-env ids whose road is not a straight multi-lane one."""


@dataclass(frozen=True)
class Hint:
    """One hint: category index per scenario dimension, sector index per agent slot (−1: no agent) and critic
    weights on the simplex."""

    scenario: tuple[int, int, int, int]
    directions: tuple[int, ...]
    weights: tuple[float, float, float]


def simplex(weights: tuple[float, ...] | list[float] | np.ndarray) -> tuple[float, float, float]:
    """Weights clipped at 0 and renormalised to sum 1 (uniform when nothing positive is left)."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    total = w.sum()
    w = w / total if total > 0 and math.isfinite(total) else np.full(len(w), 1 / len(w))
    return (float(w[0]), float(w[1]), float(w[2]))


def scenario_onehot(scenario: tuple[int, ...]) -> np.ndarray:
    """The scenario as concatenated one-hot codes: its cosine with another is the share of matching categories."""
    parts = [np.eye(len(names))[index] for index, names in zip(scenario, CATEGORIES.values(), strict=True)]
    return np.concatenate(parts)


class HintSource(ABC):
    """Turns a scene into a hint, or None when it has none; ``counts`` says what happened. Every source is built
    from the hint config and the run's seed, which a source that draws at random seeds its generator with."""

    informative: ClassVar[bool] = True
    """False for a source that never has a hint, so the controller does not ask it."""

    def __init__(self, config: HintConfig, seed: int) -> None:
        self.config = config
        self.counts: Counter[str] = Counter()

    @abstractmethod
    def hint(self, scene: Scene, context: str = "") -> Hint | None:
        """A hint for the scene; ``context`` is retrieved knowledge a source may read (the language model's)."""


HINT_SOURCES: Registry[type[HintSource]] = Registry("hint source")


@HINT_SOURCES.register("none")
class NoHints(HintSource):
    """The ablation without hints: zero semantic features and the fallback critic weights throughout."""

    informative = False

    def hint(self, scene: Scene, context: str = "") -> Hint | None:
        return None


def road_index(scene: Scene) -> int:
    return ROADS.index(scene.road) if scene.road in ROADS else 0


def oracle_hint(scene: Scene, agents: int) -> Hint:
    """The rule-based hint: density from the vehicle count, risk from time to collision and the gap ahead,
    a manoeuvre from free adjacent lanes, sectors of the nearest agents, and weights by risk."""
    count, ttc = nearby(scene), time_to_collision(scene)
    density = 0 if count <= 2 else 1 if count <= 5 else 2
    ahead = [n.dx for n in scene.neighbours if n.dx > 0 and abs(n.dy) < LANE_WIDTH / 2]
    gap = min(ahead, default=math.inf)
    risk = 2 if ttc < 2.0 or gap < 10.0 else 1 if ttc < 5.0 or gap < 25.0 else 0
    manoeuvre = 0
    if risk > 0:
        manoeuvre = 2
        for side, move in ((-1, 3), (1, 4)):
            lane = scene.lane + side
            beside = [n for n in scene.neighbours if abs(n.dy - side * LANE_WIDTH) < LANE_WIDTH / 2]
            if 0 <= lane < scene.lanes and all(n.dx < -10.0 or n.dx > 30.0 for n in beside):
                manoeuvre = move
                break
    elif gap > 30.0 and scene.speed < 25.0:
        manoeuvre = 1
    directions = tuple(sector(n) for n in scene.neighbours[:agents])
    directions += (-1,) * (agents - len(directions))
    return Hint((road_index(scene), density, risk, manoeuvre), directions, RISK_WEIGHTS[RISKS[risk]])


@HINT_SOURCES.register("oracle")
class OracleHints(HintSource):
    """Rule-based hints from the simulator's ground truth (see :func:`oracle_hint`)."""

    def hint(self, scene: Scene, context: str = "") -> Hint | None:
        self.counts["hints"] += 1
        return oracle_hint(scene, self.config.agents)


def corrupt(hint: Hint, rng: np.random.Generator) -> Hint:
    """A wrong hint: every scenario category and every present agent's sector moved to another value, and the
    weights permuted so that they differ (a plausible-looking but false hint)."""
    scenario = tuple(
        int((index + rng.integers(1, len(names))) % len(names))
        for index, names in zip(hint.scenario, CATEGORIES.values(), strict=True)
    )
    directions = tuple(d if d < 0 else int((d + rng.integers(1, 8)) % 8) for d in hint.directions)
    weights = hint.weights
    for _ in range(16):
        weights = tuple(float(x) for x in rng.permutation(np.asarray(hint.weights)))
        if weights != hint.weights:
            break
    return Hint(scenario, directions, simplex(weights))  # type: ignore[arg-type]


@HINT_SOURCES.register("noisy")
class NoisyHints(HintSource):
    """The oracle, but each hint is replaced by a wrong one (see :func:`corrupt`) with probability
    ``noise_rate``, drawn from a generator of its own seeded by the run, so runs repeat."""

    def __init__(self, config: HintConfig, seed: int) -> None:
        super().__init__(config, seed)
        self.rng = np.random.default_rng([seed, 0x4E01])

    def hint(self, scene: Scene, context: str = "") -> Hint | None:
        truth = oracle_hint(scene, self.config.agents)
        self.counts["hints"] += 1
        if self.rng.random() < self.config.noise_rate:
            self.counts["corrupted"] += 1
            return corrupt(truth, self.rng)
        return truth
