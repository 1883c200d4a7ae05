"""Environments: observations join the context with loss mask 0, step rewards land on the chosen token, turn and
token limits end episodes, a failing environment fails only its episode (with the reason, counted by the reward
pipeline), and an environment from a plugin file runs RL steps on the tiny model."""

from __future__ import annotations

import json
from functools import partial

import pytest

from incentive.config import RewardConfig, TemplateConfig, load_recipe
from incentive.data import DataConfig, load_examples
from incentive.engines import CachedEngine, SamplingParams
from incentive.engines.environment import EnvironmentEngine
from incentive.rewards.base import REWARDS, RewardContext
from incentive.rewards.pipeline import RewardPipeline
from incentive.rollout import ENVIRONMENTS, Environment, PolicyTurn, StepResult
from incentive.run import Run, build_template
from incentive.templates import TagFormat
from incentive.training.rl import RLTrainer
from incentive.training.sft import ObservationMaskingEncoder

OBSERVATION = "\n[observation]\n"


class Scripted(Environment):
    """Answers every turn with the same observation and a reward on the turn's last token; done after ``turns``
    turns (rewarding that turn's first token); raises where the example's prompt contains ``fail_on``."""

    def __init__(self, turns: int = 2, fail_on: str | None = None, fail_in: str = "step") -> None:
        self.turns = turns
        self.fail_on = fail_on
        self.fail_in = fail_in
        self.seen: list[PolicyTurn] = []

    def reset(self, example, tokenizer) -> None:
        self.failing = self.fail_on is not None and self.fail_on in example.prompt
        if self.failing and self.fail_in == "reset":
            raise RuntimeError("no such episode")

    def step(self, turn: PolicyTurn) -> StepResult:
        self.seen.append(turn)
        if self.failing:
            raise RuntimeError("boom")
        if turn.index + 1 >= self.turns:
            return StepResult(rewards={0: 1.0}, done=True, reason="answered", info={"last": turn.text})
        return StepResult(observation=OBSERVATION, rewards={-1: 0.5})


def examples_and_prompts(tokenizer, n=2):
    cfg = DataConfig(source="task:chain_sum", size=n, task_args={"min_terms": 2, "max_terms": 2})
    examples = load_examples(cfg).examples
    template = build_template(TemplateConfig())
    return examples, [template.render(e, tokenizer) for e in examples]


def episodes(tiny, make, params, n=2, **limits):
    model, tokenizer = tiny
    built: list[Scripted] = []

    def tracked() -> Environment:
        built.append(make())
        return built[-1]

    engine = EnvironmentEngine(CachedEngine(model, tokenizer), tracked, "scripted", **limits)
    built.clear()  # the engine built one to read its stop text
    examples, prompts = examples_and_prompts(tokenizer, n)
    return engine.generate(examples, prompts, list(range(n)), params), built


def test_observations_are_masked_and_step_rewards_land_on_the_chosen_tokens(tiny):
    _, tokenizer = tiny
    batch, envs = episodes(tiny, partial(Scripted, turns=3), SamplingParams(2, 12, 1.0), max_turn_tokens=3)
    obs = tokenizer(OBSERVATION, add_special_tokens=False).input_ids
    assert len(batch) == 4 and len(envs) == 4
    for c, env in zip(batch, envs, strict=True):
        turns = [t.token_ids for t in env.seen]
        assert len(turns) == 3 and all(len(t) <= 3 for t in turns)
        assert c.completion_ids == turns[0] + obs + turns[1] + obs + turns[2]
        ones = [1.0] * 3
        assert (
            c.loss_mask
            == ones[: len(turns[0])]
            + [0.0] * len(obs)
            + ones[: len(turns[1])]
            + [0.0] * len(obs)
            + ones[: len(turns[2])]
        )
        second = len(turns[0]) + len(obs)
        third = second + len(turns[1]) + len(obs)
        assert c.step_rewards == {len(turns[0]) - 1: 0.5, second + len(turns[1]) - 1: 0.5, third: 1.0}
        assert (
            c.info["ended_by"] == "answered" and c.info["turns"] == 3 and c.info["last"] == env.seen[2].text
        )
        assert env.seen[1].transcript == tokenizer.decode(turns[0] + obs + turns[1], skip_special_tokens=True)
        assert [t.ended_by for t in env.seen] in (["turn_limit"] * 3, ["turn_limit", "turn_limit", "eos"])
        assert c.logprobs[len(turns[0]) : second] == [0.0] * len(obs) and not c.truncated


def test_turn_and_token_limits_end_episodes(tiny):
    batch, envs = episodes(
        tiny, partial(Scripted, turns=99), SamplingParams(1, 40, 1.0), max_turns=2, max_turn_tokens=2
    )
    assert all(c.info["ended_by"] == "max_turns" and c.info["turns"] == 2 for c in batch)
    assert all(c.loss_mask[-1] == 1.0 for c in batch)  # the last turn's observation is not appended
    batch, _ = episodes(tiny, partial(Scripted, turns=99), SamplingParams(1, 5, 1.0), max_turn_tokens=2)
    assert all(sum(c.trained_mask) <= 5 for c in batch)
    assert all(c.info["ended_by"] == "length" and c.truncated for c in batch if sum(c.trained_mask) == 5)
    model, tokenizer = tiny
    short = EnvironmentEngine(
        CachedEngine(model, tokenizer), partial(Scripted, turns=99), max_turn_tokens=2, max_context_tokens=10
    )
    examples, prompts = examples_and_prompts(tokenizer, 1)
    (c,) = short.generate(examples, prompts, [0], SamplingParams(1, 20, 1.0))
    assert c.info["ended_by"] == "context" and 0.0 not in c.trained_mask


@pytest.mark.parametrize("where", ["reset", "step"])
def test_a_failing_environment_fails_only_its_episode(tiny, where):
    model, tokenizer = tiny
    examples, _ = examples_and_prompts(tokenizer)
    make = partial(Scripted, turns=2, fail_on=examples[1].prompt, fail_in=where)
    batch, _ = episodes(tiny, make, SamplingParams(2, 8, 1.0), max_turn_tokens=2)
    good, bad = batch.completions[:2], batch.completions[2:]
    assert all("failure" not in c.info and c.info["ended_by"] == "answered" for c in good)
    for c in bad:
        assert c.info["failure"] == f"environment 'scripted' raised RuntimeError in {where}: " + (
            "no such episode" if where == "reset" else "boom"
        )
        assert c.info["ended_by"] == "error"
        if where == "reset":
            assert c.length == 0
    scored = RewardPipeline([RewardConfig(name="format")])(batch, RewardContext(tokenizer, TagFormat()))
    assert scored.failed == [False, False, True, True]
    assert scored.failures[f"rollout: {bad[0].info['failure']}"] == 2


def test_bad_step_rewards_fail_the_episode(tiny):
    class OffTheEnd(Scripted):
        def step(self, turn):
            return StepResult(rewards={len(turn.token_ids): 1.0}, done=True)

    batch, _ = episodes(tiny, OffTheEnd, SamplingParams(1, 6, 1.0))
    assert all("step reward on token" in c.info["failure"] for c in batch)


def test_a_forced_prefix_opens_the_first_turn(tiny):
    model, tokenizer = tiny
    made: list[Scripted] = []

    def make() -> Scripted:
        made.append(Scripted(turns=2))
        return made[-1]

    engine = EnvironmentEngine(CachedEngine(model, tokenizer), make, max_turn_tokens=2)
    examples, prompts = examples_and_prompts(tokenizer, 1)
    (c,) = engine.generate(examples, prompts, [0], SamplingParams(1, 12, 1.0), prefixes=["<think>\n"])
    prefix = tokenizer("<think>\n", add_special_tokens=False).input_ids
    assert c.completion_ids[: len(prefix)] == prefix and c.loss_mask[: len(prefix)] == [1.0] * len(prefix)
    first = made[-1].seen[0]  # the whole prefix, then at most max_turn_tokens sampled tokens
    assert first.token_ids[: len(prefix)] == prefix and len(first.token_ids) <= len(prefix) + 2
    assert first.text.startswith("<think>\n")


def test_sft_masks_what_an_environment_would_have_written(tiny):
    _, tokenizer = tiny

    class Bracketed(Scripted):
        def split_responses(self, text):
            head, _, tail = text.partition(OBSERVATION)
            return [(head, False), (OBSERVATION, True), (tail, False)]

    ids, mask = ObservationMaskingEncoder(tokenizer, Bracketed())("I ask" + OBSERVATION + "I answer")
    obs = tokenizer(OBSERVATION, add_special_tokens=False).input_ids
    start = mask.index(0.0)
    assert ids[start : start + len(obs)] == obs and mask.count(0.0) == len(obs)


PLUGIN = '''
from incentive.rewards import REWARDS, Reward, RewardResult
from incentive.rollout import ENVIRONMENTS, Environment, StepResult


@ENVIRONMENTS.register("plugin_countdown")
class Countdown(Environment):
    """Says how many turns are left; the last turn's first token earns 1, every other turn's last token 0.25."""

    def __init__(self, turns: int = 2) -> None:
        self.turns = turns

    def reset(self, example, tokenizer):
        self.left = self.turns

    def step(self, turn):
        self.left -= 1
        if self.left == 0:
            return StepResult(rewards={0: 1.0}, done=True, reason="counted")
        return StepResult(observation=f"\\n[left {self.left}]\\n", rewards={-1: 0.25})


@REWARDS.register("plugin_even_written")
class EvenWritten(Reward):
    """Share of even token ids among the tokens the policy wrote."""

    def __call__(self, batch, ctx):
        scores = []
        for c in batch:
            written = [t for t, m in zip(c.completion_ids, c.trained_mask) if m]
            scores.append(sum(t % 2 == 0 for t in written) / max(1, len(written)))
        return RewardResult(scores)
'''

RECIPE = """
imports: [countdown.py]
model: {name: tiny-random}
data: {source: task:chain_sum, size: 4, task_args: {min_terms: 2, max_terms: 2}}
generation: {num_generations: 2, prompts_per_step: 2, max_new_tokens: 10}
environment: {name: plugin_countdown, args: {turns: 3}, max_turn_tokens: 3}
rewards: [{name: plugin_even_written}]
optim: {lr: 1.0e-3}
rl: {steps: 2}
"""


def test_an_environment_from_a_plugin_file_runs_rl_steps(tiny, tmp_path, monkeypatch):
    _, tokenizer = tiny
    for registry in (ENVIRONMENTS, REWARDS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    (tmp_path / "countdown.py").write_text(PLUGIN)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    batches = []
    original = RLTrainer._rollout

    def keep(self, step, examples, times):
        batch, scored = original(self, step, examples, times)
        batches.append(batch)
        return batch, scored

    monkeypatch.setattr(RLTrainer, "_rollout", keep)
    run = Run(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run")
    run.execute()
    records = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r.get("stage") == "rl"]
    assert [r["step"] for r in rl] == [1, 2] and all(r["env/failed_share"] == 0.0 for r in rl)
    assert any(r["train/skipped"] == 0.0 for r in rl)
    for batch in batches:
        for c in batch:
            observations = [f"\n[left {k}]\n" for k in (2, 1)][: c.info["turns"] - 1]
            masked = [t for t, m in zip(c.completion_ids, c.loss_mask, strict=True) if m == 0.0]
            assert masked == [
                t for o in observations for t in tokenizer(o, add_special_tokens=False).input_ids
            ]
            assert c.info["turns"] == 3 or c.info["ended_by"] == "length"
            for at, reward in c.step_rewards.items():
                assert c.loss_mask[at] == 1.0  # on a token the policy wrote
                after = c.loss_mask[at + 1] if at + 1 < c.length else None
                before = c.loss_mask[at - 1] if at > 0 else None
                assert (reward == 0.25 and after in (0.0, None)) or (reward == 1.0 and before == 0.0)
