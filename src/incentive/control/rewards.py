"""The reward of one control step split into the components that each have a critic: safety, efficiency, comfort."""

from __future__ import annotations

import math

import numpy as np

from incentive.control.config import RewardConfig
from incentive.control.envs import Transition
from incentive.control.scene import LANE_WIDTH, Scene, time_to_collision


def reward_components(
    step: Transition, scene: Scene, action: np.ndarray, previous: np.ndarray, config: RewardConfig
) -> np.ndarray:
    """[safety, efficiency, comfort] of a step: safety is −collision_penalty on a crash or on leaving the road,
    else −ttc_weight·max(0, 1 − TTC/ttc_safe) − lane_weight·min(1, |offset| / (lane width / 2)); efficiency
    is the forward speed mapped linearly from speed_range to [0, 1] and clipped; comfort is
    −comfort_scale·mean |a_t − a_{t−1}| (jerk and steering rate)."""
    if step.crashed or step.offroad:
        safety = -config.collision_penalty
    else:
        ttc = time_to_collision(scene)
        safety = -config.ttc_weight * max(0.0, 1.0 - ttc / config.ttc_safe) if math.isfinite(ttc) else 0.0
        safety -= config.lane_weight * min(1.0, abs(scene.offset) / (LANE_WIDTH / 2))
    low, high = config.speed_range
    efficiency = min(max((step.speed - low) / (high - low), 0.0), 1.0)
    comfort = -config.comfort_scale * float(np.mean(np.abs(np.asarray(action) - np.asarray(previous))))
    return np.array([safety, efficiency, comfort], dtype=np.float64)
