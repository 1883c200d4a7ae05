"""A simulator-agnostic description of the ego vehicle's surroundings: what hint sources read and describe."""

from __future__ import annotations

import math
from dataclasses import dataclass

LANE_WIDTH = 4.0
"""Metres between lane centres (highway-env's default)."""

AHEAD_SCALE = 10.0
"""Metres of longitudinal offset that count as much as one lane of lateral offset when picking a sector."""

SECTORS = ("front", "front-left", "left", "rear-left", "rear", "rear-right", "right", "front-right")
"""The 8 direction categories of a surrounding agent, counter-clockwise from straight ahead."""

RANGE = 60.0
"""Metres around the ego within which a vehicle counts toward the traffic density."""


@dataclass(frozen=True)
class Neighbour:
    """Another vehicle relative to the ego: ahead (dx > 0) and to the right (dy > 0) in metres, and its forward
    speed minus the ego's in m/s."""

    dx: float
    dy: float
    dv: float

    @property
    def distance(self) -> float:
        return math.hypot(self.dx, self.dy)


@dataclass(frozen=True)
class Scene:
    """The ego's road, lane, forward speed (m/s), neighbours (nearest first) and offset from its lane's centre
    (metres, right positive)."""

    road: str
    lanes: int
    lane: int
    speed: float
    neighbours: tuple[Neighbour, ...]
    offset: float = 0.0


def sector(n: Neighbour) -> int:
    """Index into SECTORS of a neighbour's direction, with one lane weighing as much as AHEAD_SCALE metres."""
    angle = math.atan2(-n.dy / LANE_WIDTH, n.dx / AHEAD_SCALE)
    return round(angle / (math.pi / 4)) % len(SECTORS)


def time_to_collision(scene: Scene) -> float:
    """Seconds until the ego reaches the nearest slower vehicle ahead in its lane; inf when none is closing in."""
    ttc = math.inf
    for n in scene.neighbours:
        if n.dx > 0 and abs(n.dy) < LANE_WIDTH / 2 and n.dv < 0:
            ttc = min(ttc, n.dx / -n.dv)
    return ttc


def nearby(scene: Scene) -> int:
    """Vehicles within RANGE metres of the ego."""
    return sum(n.distance <= RANGE for n in scene.neighbours)


def describe(scene: Scene, agents: int) -> str:
    """The scene as text for a language model: road, ego lane and speed, and the nearest ``agents`` vehicles."""
    ttc = time_to_collision(scene)
    lines = [
        f"Road: {scene.road} with {scene.lanes} lanes. Ego car in lane {scene.lane + 1} of {scene.lanes} "
        f"(lane 1 is leftmost), speed {scene.speed:.1f} m/s.",
        f"Vehicles within {RANGE:.0f} m: {nearby(scene)}. "
        + (f"Time to collision ahead: {ttc:.1f} s." if math.isfinite(ttc) else "No vehicle closing in ahead."),
    ]
    for i, n in enumerate(scene.neighbours[:agents], 1):
        rel = "faster" if n.dv >= 0 else "slower"
        lines.append(
            f"Vehicle {i}: {abs(n.dx):.0f} m {'ahead' if n.dx >= 0 else 'behind'}, "
            f"{abs(n.dy):.1f} m to the {'right' if n.dy >= 0 else 'left'}, {abs(n.dv):.1f} m/s {rel}."
        )
    return "\n".join(lines)


def embedding(scene: Scene, agents: int) -> list[float]:
    """A numeric summary of the scene for the cache's similarity lookup: ego speed, lane, density, time to
    collision, then (dx, dy, dv) of the nearest ``agents`` vehicles, each roughly scaled to [−1, 1]."""
    ttc = min(time_to_collision(scene), 10.0)
    out = [scene.speed / 30.0, scene.lane / max(scene.lanes - 1, 1), nearby(scene) / 10.0, ttc / 10.0]
    for n in scene.neighbours[:agents]:
        out += [n.dx / RANGE, n.dy / (2 * LANE_WIDTH), n.dv / 10.0]
    return out + [0.0] * (3 * (agents - min(agents, len(scene.neighbours))))
