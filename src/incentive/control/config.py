"""Typed configuration of ``incentive control``: unknown keys fail, and every problem is one line naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from incentive.config import (
    RecipeTree,
    Strict,
    registered,
)

COMPONENTS = ("safety", "efficiency", "comfort")
"""The reward components, one critic each, in the order of every weight vector."""


class EnvConfig(Strict):
    """The driving simulator and its size."""

    name: str = Field("highway", description="highway (highway-env, needs incentive[control]) or stub (pure numpy)")
    scenario: str = Field("highway-v0", description="highway-env environment id (highway only)")
    lanes: int = Field(3, ge=1)
    vehicles: int = Field(15, ge=0, description="other vehicles on the road")
    density: float = Field(1.0, gt=0)
    duration: float = Field(20.0, gt=0, description="episode length in simulated seconds")
    policy_frequency: int = Field(2, ge=1, description="control steps per simulated second")
    simulation_frequency: int = Field(10, ge=1)
    observed_vehicles: int = Field(5, ge=1, description="rows of the Kinematics observation (ego included)")
    steering: float = Field(0.03, gt=0, description="steering angle at action ±1, rad")
    acceleration: float = Field(5.0, gt=0, description="acceleration at action ±1, m/s²")
    offroad_terminal: bool = Field(True, description="leaving the road ends the episode as a failure")
    success_min_speed: float = Field(
        10.0,
        description="mean forward speed, m/s, an episode needs to count as a success: braking to a stop or "
        "reversing until the time limit avoids every crash but drives nowhere",
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.control.envs", "ENVIRONMENTS", name)


class RewardConfig(Strict):
    """How the three reward components (safety, efficiency, comfort) are computed per control step."""

    collision_penalty: float = Field(
        5.0,
        ge=0,
        description="safety reward (negated) of a crash or of leaving the road; at 1 it weighs about as much as "
        "one step at top speed, and the policy learns to drive fast and crash",
    )
    ttc_safe: float = Field(4.0, gt=0, description="time to collision (s) below which safety is penalised")
    ttc_weight: float = Field(0.5, ge=0, description="safety penalty at time to collision 0")
    lane_weight: float = Field(0.1, ge=0, description="safety penalty at half a lane width off the lane centre")
    speed_range: tuple[float, float] = Field((20.0, 30.0), description="forward speed mapped to efficiency 0..1")
    comfort_scale: float = Field(0.5, ge=0, description="comfort = −scale·mean |a_t − a_{t−1}|")

    @field_validator("speed_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"speed_range must be [low, high] with low < high, got {list(value)}")
        return value


class HintConfig(Strict):
    """Where hints come from, and what they hold."""

    source: str = Field("oracle", description="none, oracle, noisy, lm or a registered hint source")
    agents: int = Field(3, ge=0, description="N: critical surrounding agents given a direction sector")
    noise_rate: float = Field(0.42, ge=0, le=1, description="noisy: probability that a hint is wrong")
    model: str = Field("embedded", description="lm: the language model")
    max_new_tokens: int = Field(96, ge=8, description="lm: tokens generated per hint")
    fallback_weights: tuple[float, float, float] = Field(
        (1 / 3, 1 / 3, 1 / 3), description="critic weights when no valid hint is held (renormalised)"
    )

    @field_validator("source")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.control.sources", "HINT_SOURCES", name)

    @field_validator("fallback_weights")
    @classmethod
    def _simplex(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or sum(value) <= 0:
            raise ValueError(f"fallback_weights must be >= 0 with a positive sum, got {list(value)}")
        return value


class CacheConfig(Strict):
    """The semantic cache between the slow hint source and the per-step controller."""

    query_period: int = Field(10, ge=1, description="control steps between queries of the hint source")
    ttl: int = Field(50, ge=1, description="control steps a hint stays valid")
    reuse_similarity: float | None = Field(
        None, ge=-1, le=1, description="reuse a stored hint of a scene at least this similar (cosine); null: off"
    )
    size: int = Field(256, ge=1, description="stored hints for reuse (least recently used dropped)")


class AnchorConfig(Strict):
    """The contextual stability anchor: a knowledge base of validated weights that steadies hinted weights."""

    enabled: bool = True
    top_m: int = Field(5, ge=1, description="m: nearest knowledge-base entries read")
    threshold: float = Field(0.9, ge=-1, le=1, description="τ_kb: least cosine similarity of an entry used")
    strength: float = Field(0.5, ge=0, le=1, description="λ: w = (1−λ)·w_hint + λ·anchor")
    reject_distance: float | None = Field(
        None, gt=0, description="δ: a hint farther than this (L2) from the anchor is replaced by it; null: off"
    )
    rag: bool = Field(False, description="lm: give the nearest validated weights to the model in its prompt")
    capacity: int = Field(2000, ge=1, description="entries kept (oldest dropped)")
    min_return: float = Field(0.0, description="least mean per-step efficiency of an episode whose hints are kept")


class PPOConfig(Strict):
    """Multi-critic PPO with a Beta policy."""

    total_steps: int = Field(2048, ge=1, description="control steps of training")
    rollout_steps: int = Field(256, ge=2, description="control steps per update")
    epochs: int = Field(8, ge=1)
    minibatch: int = Field(64, ge=1)
    gamma: float = Field(0.95, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0)
    lr: float = Field(1e-3, gt=0)
    hidden: int = Field(64, ge=1)
    entropy_coef: float = Field(0.0, ge=0)
    value_coef: float = Field(0.5, ge=0)
    max_grad_norm: float = Field(0.5, gt=0)
    normalize: Literal["per_critic", "mixed", "none"] = Field(
        "per_critic", description="advantage normalisation: each critic's before mixing, the mix, or none"
    )
    init_concentration: float = Field(4.0, gt=1, description="α = β of the Beta policy before training")


class EvalConfig(Strict):
    episodes: int = Field(10, ge=0, description="episodes of the final evaluation (policy mean action)")
    seed: int = Field(10_000, description="first episode seed of the evaluation (training uses seed + i)")


class RunConfig(Strict):
    output_dir: str = "runs"
    name: str | None = None
    seed: int = 0


class ControlRecipe(Strict):
    """A whole ``incentive control`` recipe."""

    description: str = ""
    env: EnvConfig = EnvConfig()
    rewards: RewardConfig = RewardConfig()
    hints: HintConfig = HintConfig()
    cache: CacheConfig = CacheConfig()
    anchor: AnchorConfig = AnchorConfig()
    ppo: PPOConfig = PPOConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ControlRecipe:
        if self.ppo.minibatch > self.ppo.rollout_steps:
            raise ValueError(
                f"ppo.minibatch ({self.ppo.minibatch}) is larger than ppo.rollout_steps ({self.ppo.rollout_steps})"
            )
        return self


def load_control_recipe(path: str | Path, overrides: list[str] | None = None) -> ControlRecipe:
    """The recipe file with ``--set key=value`` overrides applied, validated; a problem is one ConfigError line."""
    recipe = RecipeTree(path)
    recipe.override(overrides or [])
    return recipe.validate(ControlRecipe)
