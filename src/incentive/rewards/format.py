"""Strict tag-format reward: 1 iff the completion is exactly one reasoning block then one answer block."""

from __future__ import annotations

from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch


@REWARDS.register("format")
class FormatReward(Reward):
    """NOVER-style strict format: whitespace is ignored, anything outside the two blocks is not."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        return RewardResult([1.0 if p.strict else 0.0 for p in ctx.parsed(batch)])
