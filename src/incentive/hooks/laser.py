"""LASER-D's automatic adapting mechanism as a hook: re-estimate the difficulty-aware target lengths from a fixed
monitoring set of training prompts before training and every ``every`` steps (spec: methods/laser.md §4)."""

from __future__ import annotations

import dataclasses
import random
import time
from typing import TYPE_CHECKING, Any, get_args

from incentive.data.example import Example
from incentive.hooks.base import HOOKS, Hook
from incentive.rewards.base import RewardContext
from incentive.rewards.laser import STATE_KEY, RoundMethod, estimate_targets, length_thresholds
from incentive.rewards.outcome import outcomes

if TYPE_CHECKING:
    from incentive.training.rl import RLTrainer


@HOOKS.register("laser_monitor")
class LaserMonitor(Hook):
    """Samples ``samples`` completions (default: the training G) for each of ``size`` fixed training prompts with
    the current policy, buckets prompts by accuracy and writes each bucket's target to the shared state.

    Candidates run from ``lower`` to ``upper`` (default: generation.max_new_tokens) in steps of ``interval``
    (default: upper / 16; lower defaults to one interval)."""

    def __init__(
        self,
        every: int = 20,
        size: int = 500,
        samples: int | None = None,
        lower: int | None = None,
        upper: int | None = None,
        interval: int | None = None,
        expected_n_correct: int = 1,
        round_method: RoundMethod = "floor",
        seed: int = 0,
    ) -> None:
        if round_method not in get_args(RoundMethod):
            raise ValueError(f"round_method must be one of {get_args(RoundMethod)}, got {round_method!r}")
        if every < 0 or size < 1 or (samples is not None and samples < 1):
            raise ValueError("laser_monitor needs every ≥ 0, size ≥ 1 and samples ≥ 1")
        self.every, self.size, self.samples = every, size, samples
        self.lower, self.upper, self.interval = lower, upper, interval
        self.expected_n_correct, self.round_method, self.seed = expected_n_correct, round_method, seed
        self.passes = 0

    def start(self, trainer: RLTrainer) -> None:
        self.monitor(trainer)

    def after_step(self, step: int, record: dict[str, Any], trainer: RLTrainer) -> None:
        if self.every and step % self.every == 0:
            start = time.perf_counter()
            self.monitor(trainer)
            record["time/laser_monitor_s"] = time.perf_counter() - start
        for bucket, target in (trainer.state.get(STATE_KEY) or {}).items():
            if target is not None:
                record[f"laser/target_{bucket}"] = target
        record["laser/monitor_passes"] = self.passes

    def monitoring_set(self, examples: list[Example]) -> list[Example]:
        """The same ``size`` training prompts at every pass."""
        return random.Random(self.seed).sample(examples, min(self.size, len(examples)))

    def monitor(self, trainer: RLTrainer) -> None:
        p, params = trainer.p, trainer.params
        examples = self.monitoring_set(list(p.sampler.items))
        n = self.samples or params.n
        upper = self.upper or params.max_new_tokens
        interval = self.interval or max(1, upper // 16)
        thresholds = length_thresholds(self.lower or interval, upper, interval)
        prompts = [p.template.render(e, p.tokenizer) for e in examples]
        ids = list(range(len(examples)))
        batch = p.engine.generate(examples, prompts, ids, dataclasses.replace(params, n=n))
        flags = outcomes(batch, RewardContext(p.tokenizer, p.template.tags))
        groups = [
            ([batch.completions[i].length for i in idx], [flags[i].correct for i in idx])
            for idx in batch.groups().values()
        ]
        targets = estimate_targets(groups, thresholds, n, self.expected_n_correct, self.round_method)
        trainer.state[STATE_KEY] = targets
        self.passes += 1

    def state_dict(self) -> dict[str, Any]:
        return {"passes": self.passes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.passes = int(state.get("passes", 0))
