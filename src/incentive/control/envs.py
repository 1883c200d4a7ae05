"""Driving environments behind one small interface, registered by name: highway-env (a CPU stand-in for CARLA,
imported only when used) and a pure-numpy stub road for fast tests."""

from __future__ import annotations

import importlib.util
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from incentive.control.config import EnvConfig
from incentive.control.hints import ROAD_OF_SCENARIO
from incentive.control.scene import LANE_WIDTH, Neighbour, Scene
from incentive.registry import Registry

FEATURES = ("presence", "x", "y", "vx", "vy", "heading", "lat_off")
"""Per-vehicle observation features (highway-env's Kinematics names), ego first, others ego-relative; lat_off is
the offset from the lane centre in metres, which makes lane keeping learnable from few steps."""

INSTALL_HINT = "pip install 'incentive[control]'"


@dataclass(frozen=True)
class Transition:
    """What one control step did: the next raw observation, how the episode stands and the ego's forward speed."""

    observation: np.ndarray
    crashed: bool
    offroad: bool
    terminated: bool
    truncated: bool
    speed: float


class ControlEnv(ABC):
    """A driving task with continuous (acceleration, steering) actions in [−1, 1]²."""

    requires: ClassVar[tuple[str, ...]] = ()
    """Importable modules it needs; missing ones are refused before anything loads."""

    def __init__(self, config: EnvConfig) -> None:
        self.config = config
        self.observation_size = config.observed_vehicles * len(FEATURES)
        self.max_steps = int(round(config.duration * config.policy_frequency))

    @abstractmethod
    def reset(self, seed: int) -> np.ndarray:
        """Start an episode laid out by ``seed``; returns its first raw observation (flat, float32)."""

    @abstractmethod
    def step(self, action: np.ndarray) -> Transition:
        """Apply an action of shape (2,) in [−1, 1]."""

    @abstractmethod
    def scene(self) -> Scene:
        """The current surroundings of the ego."""

    def close(self) -> None:
        return None


ENVIRONMENTS: Registry[type[ControlEnv]] = Registry("control environment")


def missing_modules(env: type[ControlEnv]) -> list[str]:
    """The modules ``env`` needs that are not installed."""
    return [name for name in env.requires if importlib.util.find_spec(name) is None]


@ENVIRONMENTS.register("highway")
class HighwayEnv(ControlEnv):
    """highway-env's ``env.scenario`` with ContinuousAction and a Kinematics observation; stands in for CARLA."""

    requires = ("highway_env", "gymnasium")

    def __init__(self, config: EnvConfig) -> None:
        super().__init__(config)
        import gymnasium
        import highway_env  # noqa: F401  (registers the environments with gymnasium)

        self.env: Any = gymnasium.make(config.scenario, config=self.settings(config))
        self.road = ROAD_OF_SCENARIO.get(config.scenario, "straight")

    @staticmethod
    def settings(config: EnvConfig) -> dict[str, Any]:
        """highway-env's configuration for ``config``."""
        return {
            "action": {
                "type": "ContinuousAction",
                "acceleration_range": [-config.acceleration, config.acceleration],
                "steering_range": [-config.steering, config.steering],
            },
            "observation": {
                "type": "Kinematics",
                "vehicles_count": config.observed_vehicles,
                "features": list(FEATURES),
                "absolute": False,
                "normalize": True,
            },
            "lanes_count": config.lanes,
            "vehicles_count": config.vehicles,
            "vehicles_density": config.density,
            "duration": config.duration,
            "policy_frequency": config.policy_frequency,
            "simulation_frequency": config.simulation_frequency,
            "offroad_terminal": config.offroad_terminal,
        }

    def reset(self, seed: int) -> np.ndarray:
        obs, _ = self.env.reset(seed=seed)
        return np.asarray(obs, dtype=np.float32).reshape(-1)

    def step(self, action: np.ndarray) -> Transition:
        obs, _, terminated, truncated, info = self.env.step(np.asarray(action, dtype=np.float32))
        ego = self.env.unwrapped.vehicle
        return Transition(
            np.asarray(obs, dtype=np.float32).reshape(-1),
            bool(info["crashed"]),
            not ego.on_road,
            bool(terminated),
            bool(truncated),
            float(ego.speed * math.cos(ego.heading)),
        )

    def scene(self) -> Scene:
        world = self.env.unwrapped
        ego = world.vehicle
        lane = ego.lane
        ego_s, ego_r = lane.local_coordinates(ego.position)
        neighbours = []
        for other in world.road.vehicles:
            if other is ego:
                continue
            s, r = lane.local_coordinates(other.position)
            dv = other.speed * math.cos(other.heading - ego.heading) - ego.speed
            neighbours.append(Neighbour(float(s - ego_s), float(r - ego_r), float(dv)))
        neighbours.sort(key=lambda n: n.distance)
        lanes = len(world.road.network.all_side_lanes(ego.lane_index))
        speed = float(ego.speed * math.cos(ego.heading))
        return Scene(self.road, lanes, int(ego.lane_index[2]), speed, tuple(neighbours), float(ego_r))

    def close(self) -> None:
        self.env.close()


@ENVIRONMENTS.register("stub")
class StubRoad(ControlEnv):
    """A straight multi-lane road in numpy: other cars keep lane and speed, the ego follows a kinematic model.
    Same interface and observation layout as highway-env's; for tests and quick checks, not for results."""

    CAR_LENGTH = 5.0
    CAR_WIDTH = 2.0

    def __init__(self, config: EnvConfig) -> None:
        super().__init__(config)
        self.dt = 1.0 / config.policy_frequency

    def reset(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        c = self.config
        self.t = 0
        self.ego = np.array([0.0, LANE_WIDTH * rng.integers(c.lanes), 25.0, 0.0])  # x, y, speed, heading
        self.others = np.column_stack(
            [
                rng.uniform(15.0, 15.0 + 40.0 * max(c.vehicles, 1) / c.density, c.vehicles),
                LANE_WIDTH * rng.integers(c.lanes, size=c.vehicles),
                rng.uniform(18.0, 24.0, c.vehicles),
            ]
        ).reshape(c.vehicles, 3)
        return self.observe()

    def step(self, action: np.ndarray) -> Transition:
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        x, y, v, h = self.ego
        h += v * math.sin(a[1] * self.config.steering) / (self.CAR_LENGTH / 2) * self.dt
        v = float(np.clip(v + a[0] * self.config.acceleration * self.dt, 0.0, 40.0))
        self.ego = np.array([x + v * math.cos(h) * self.dt, y + v * math.sin(h) * self.dt, v, h])
        self.others[:, 0] += self.others[:, 2] * self.dt
        self.t += 1
        d = self.others[:, :2] - self.ego[:2]
        crashed = bool(np.any((np.abs(d[:, 0]) < self.CAR_LENGTH) & (np.abs(d[:, 1]) < self.CAR_WIDTH)))
        half = LANE_WIDTH / 2
        offroad = not -half <= self.ego[1] <= LANE_WIDTH * (self.config.lanes - 1) + half
        terminated = crashed or (offroad and self.config.offroad_terminal)
        truncated = not terminated and self.t >= self.max_steps
        return Transition(self.observe(), crashed, offroad, terminated, truncated, float(v * math.cos(h)))

    def observe(self) -> np.ndarray:
        x, y, v, h = self.ego
        rows = np.zeros((self.config.observed_vehicles, len(FEATURES)), dtype=np.float32)
        top = LANE_WIDTH * self.config.lanes
        scene = self.scene()
        rows[0] = [1.0, 0.0, y / top, v * math.cos(h) / 80.0, v * math.sin(h) / 80.0, h, scene.offset]
        for i, n in enumerate(scene.neighbours[: self.config.observed_vehicles - 1], 1):
            rows[i] = [1.0, n.dx / 200.0, n.dy / top, n.dv / 80.0, -v * math.sin(h) / 80.0, 0.0, 0.0]
        return rows.reshape(-1)

    def scene(self) -> Scene:
        x, y, v, h = self.ego
        forward = v * math.cos(h)
        neighbours = [Neighbour(float(ox - x), float(oy - y), float(ov - forward)) for ox, oy, ov in self.others]
        neighbours.sort(key=lambda n: n.distance)
        lane = int(np.clip(round(y / LANE_WIDTH), 0, self.config.lanes - 1))
        offset = float(y - LANE_WIDTH * lane)
        return Scene("straight", self.config.lanes, lane, float(v * math.cos(h)), tuple(neighbours), offset)
