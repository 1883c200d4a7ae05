"""AvatarShield's temporal compensation reward (spec: methods/avatarshield.md; reconstructed as Video-R1's
T-GRPO rule, the paper's equation was not readable), on a text stand-in: a clip is a prompt whose frames are
lines ``f<k>: …``. For each group, G̃ extra rollouts see the frames shuffled (and renumbered); correct ordered
rollouts earn α when the group's ordered accuracy p beats the shuffled accuracy p̃ (``ratio``: p ≥ μ·p̃).
The shuffled rollouts only measure p̃; they are never trained on."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from typing import Literal, get_args

from incentive.data.example import Example
from incentive.rewards.base import REWARDS, Generate, Reward, RewardContext, RewardResult
from incentive.rewards.verifier import RuleVerifier, normalize
from incentive.rollout.types import RolloutBatch

TemporalRule = Literal["ratio", "margin", "fake_only"]
_FRAME = re.compile(r"^f\d+:(.*)$")


def shuffle_frames(prompt: str, rng: random.Random) -> str | None:
    """The prompt with its frame lines permuted and renumbered f1, f2, … in the new order (so the order cannot
    be read back from the indices); never the original order. None when fewer than two frames differ."""
    lines = prompt.split("\n")
    found = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _FRAME.match(line))]
    where, frames = [i for i, _ in found], [frame for _, frame in found]
    if len(set(frames)) < 2:
        return None
    shuffled = list(frames)
    while shuffled == frames:
        rng.shuffle(shuffled)
    for k, (i, frame) in enumerate(zip(where, shuffled, strict=True), start=1):
        lines[i] = f"f{k}:{frame}"
    return "\n".join(lines)


def temporal_pass(
    p: float, p_shuffled: float, rule: TemporalRule, mu: float, margin: float, fake: bool
) -> bool:
    """Whether the group used the frame order: p ≥ μ·p̃ (``ratio``; trivially true when p̃ = 0), p − p̃ > margin
    (``margin``), or the ratio rule on fake clips only (``fake_only``)."""
    if rule == "margin":
        return p - p_shuffled > margin
    return p >= mu * p_shuffled and (rule == "ratio" or fake)


@REWARDS.register("temporal_compensation")
class TemporalCompensation(Reward):
    """α for each correct ordered rollout of a group that passes the temporal rule. Correctness is the rule
    verifier's on the answer (labels compared normalised: "Fake." = "fake")."""

    def __init__(
        self,
        alpha: float = 0.3,
        mu: float = 0.8,
        shuffled_share: float = 0.5,
        rule: TemporalRule = "ratio",
        margin: float = 0.1,
        fake_label: str = "fake",
        seed: int = 0,
    ) -> None:
        if rule not in get_args(TemporalRule):
            raise ValueError(f"rule must be one of {get_args(TemporalRule)}, got {rule!r}")
        if not 0 < shuffled_share <= 1:
            raise ValueError(f"shuffled_share must be in (0, 1], got {shuffled_share}")
        self.alpha, self.mu, self.share, self.rule, self.margin = alpha, mu, shuffled_share, rule, margin
        self.fake_label, self.seed = normalize(fake_label), seed
        self.verifier = RuleVerifier()

    def correct(self, batch: RolloutBatch, ctx: RewardContext) -> list[bool]:
        return [v.correct for v in self.verifier.verdicts(batch, ctx)]

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        if ctx.generate is None:
            raise ValueError("temporal_compensation needs extra rollouts (RewardContext.generate)")
        correct = self.correct(batch, ctx)
        groups = list(batch.groups().items())
        shuffled, owners = [], []
        for gid, idx in groups:
            example = batch.completions[idx[0]].example
            prompt = shuffle_frames(example.prompt, random.Random(f"{self.seed}:{ctx.step}:{gid}"))
            if prompt is not None:
                shuffled.append(dataclasses.replace(example, prompt=prompt, id=f"{example.id}:shuffled"))
                owners.append(gid)
        n = max(1, round(max(len(idx) for _, idx in groups) * self.share))
        p_shuffled = self._shuffled_accuracy(ctx, ctx.generate, shuffled, owners, n)
        scores, passes = [0.0] * len(batch), [0.0] * len(batch)
        p_ordered, p_tilde = [0.0] * len(batch), [float("nan")] * len(batch)
        for gid, idx in groups:
            p = sum(correct[i] for i in idx) / len(idx)
            fake = normalize(batch.completions[idx[0]].example.reference) == self.fake_label
            ok = gid in p_shuffled and temporal_pass(
                p, p_shuffled[gid], self.rule, self.mu, self.margin, fake
            )
            for i in idx:
                scores[i] = self.alpha if ok and correct[i] else 0.0
                passes[i], p_ordered[i], p_tilde[i] = float(ok), p, p_shuffled.get(gid, float("nan"))
        extras = {"temporal_pass": passes, "p_ordered": p_ordered, "p_shuffled": p_tilde}
        return RewardResult(scores, extras=extras)

    def _shuffled_accuracy(
        self, ctx: RewardContext, generate: Generate, examples: Sequence[Example], owners: list[int], n: int
    ) -> dict[int, float]:
        """p̃ per group id, from n rollouts of each shuffled clip (one generate call for the batch)."""
        if not examples:
            return {}
        extra = generate(examples, n)
        correct = self.correct(extra, dataclasses.replace(ctx, cache={}))
        return {
            owners[local]: sum(correct[i] for i in idx) / len(idx) for local, idx in extra.groups().items()
        }
