"""Rollout strategies: forced assistant prefixes (placement after the prompt, kept in the completion and in the loss
mask, logprobs of the policy), the ``prefixes`` strategy's shares, labels and group ids, ``plain`` unchanged, the
per-label reward metrics of an RL step, and the recipe-load checks."""

from __future__ import annotations

import json

import pytest
import torch

from incentive.config import ConfigError, TemplateConfig, load_recipe
from incentive.data import DataConfig, load_examples
from incentive.engines import ENGINES, CachedEngine, HFEngine, SamplingParams
from incentive.logprobs import target_logprobs
from incentive.rollout import ROLLOUT_STRATEGIES, RolloutContext, Variant
from incentive.rollout.prefixes import Prefixes, split_counts
from incentive.rollout.sampling import plan_requests, sample_requests
from incentive.rollout.strategy import Plain
from incentive.run import Run, build_template
from incentive.training.rl import RLTrainer, reward_by_label

THINK = "<think>\n"


def prompts_for(tokenizer, n=2):
    cfg = DataConfig(source="task:chain_sum", size=n, task_args={"min_terms": 2, "max_terms": 2})
    examples = load_examples(cfg).examples
    template = build_template(TemplateConfig())
    return examples, [template.render(e, tokenizer) for e in examples]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("engine", ["cached", "hf"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_forced_prefix_follows_the_prompt_and_is_kept_as_if_sampled(tiny, engine, temperature):
    model, tokenizer = tiny
    examples, prompts = prompts_for(tokenizer)
    n = 2 if temperature else 1  # HF generate refuses greedy with n > 1
    params = SamplingParams(n, 10, temperature)
    torch.manual_seed(0)
    got = ENGINES.get(engine)(model, tokenizer).generate(
        examples, prompts, [3, 4], params, prefixes=[THINK, ""]
    )
    prefix, prompt = ids(tokenizer, THINK), ids(tokenizer, prompts[0])
    (want_prefix_lp,) = target_logprobs(model, [prompt], [prefix], temperature=temperature or 1.0)
    for c in got.completions[:n]:
        assert c.prompt_ids == prompt and c.completion_ids[: len(prefix)] == prefix
        assert c.text.startswith(THINK) and len(c.logprobs) == c.length <= params.max_new_tokens
        assert c.trained_mask == [1.0] * c.length  # in the loss as if the policy wrote it
        torch.testing.assert_close(
            torch.tensor(c.logprobs[: len(prefix)]), want_prefix_lp, atol=1e-4, rtol=1e-4
        )
    assert [c.group_id for c in got] == [3] * n + [4] * n
    if temperature == 0:  # the sampled rest is the policy's continuation of prompt + prefix
        greedy = SamplingParams(1, params.max_new_tokens - len(prefix), 0.0)
        (rest,) = CachedEngine(model, tokenizer).decode([prompt + prefix], greedy)
        assert got.completions[0].completion_ids[len(prefix) :] == rest.tokens
        plain = ENGINES.get(engine)(model, tokenizer).generate(examples[1:], prompts[1:], [4], params)
        assert (
            got.completions[n].completion_ids == plain.completions[0].completion_ids
        )  # no prefix: as without prefixes


def test_cached_and_hf_engines_agree_on_forced_prefixes(tiny):
    model, tokenizer = tiny
    examples, prompts = prompts_for(tokenizer)
    params = SamplingParams(1, 9, 0.0)
    prefixes = [THINK, "/no_think\n"]
    a = HFEngine(model, tokenizer).generate(examples, prompts, [0, 1], params, prefixes=prefixes)
    b = CachedEngine(model, tokenizer).generate(examples, prompts, [0, 1], params, prefixes=prefixes)
    assert [c.completion_ids for c in a] == [c.completion_ids for c in b]
    assert [c.truncated for c in a] == [c.truncated for c in b]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=1e-4)


def test_a_prefix_must_leave_room_and_an_engine_must_support_it(tiny):
    model, tokenizer = tiny
    examples, prompts = prompts_for(tokenizer, 1)
    with pytest.raises(ValueError, match="leaves no room within max_new_tokens 3"):
        CachedEngine(model, tokenizer).generate(
            examples, prompts, [0], SamplingParams(1, 3), prefixes=[THINK]
        )

    class NoPrefixes(HFEngine):
        forced_prefixes = False

    with pytest.raises(ValueError, match="NoPrefixes cannot force assistant prefixes"):
        NoPrefixes(model, tokenizer).generate(examples, prompts, [0], SamplingParams(1, 8), prefixes=[THINK])
    assert not ENGINES.get("vllm").forced_prefixes


def test_shares_split_a_group_by_largest_remainder():
    assert split_counts([1, 1], 4) == [2, 2]
    assert split_counts([3, 1], 4) == [3, 1]
    assert split_counts([1, 1, 1], 4) == [2, 1, 1]
    assert split_counts([0.5, 0.5], 1) == [1, 0]
    assert split_counts([0.2, 0.8], 8) == [2, 6]


def two_modes(**kw) -> Prefixes:
    modes = [
        {"name": "think", "prefix": THINK, "share": 0.75},
        {"name": "fast", "prefix": "/no_think\n", "share": 0.25, "max_new_tokens": 7},
    ]
    return Prefixes(modes, **kw)


def test_prefix_modes_share_the_example_group_unless_separated(tiny):
    model, tokenizer = tiny
    examples, _ = prompts_for(tokenizer)
    ctx = RolloutContext(build_template(TemplateConfig()), tokenizer, 4)
    base = SamplingParams(4, 8, 1.0)
    plans = [two_modes().variants(e, ctx) for e in examples]
    assert [(v.n, v.prefix, v.labels) for v in plans[0]] == [
        (3, THINK, {"mode": "think"}),
        (1, "/no_think\n", {"mode": "fast"}),
    ]
    requests, used = plan_requests(examples, plans, 10, base)
    assert used == 2 and [r.group_id for r in requests] == [10, 10, 11, 11]
    assert requests[1].params == SamplingParams(1, 7, 1.0)
    separate = [two_modes(separate_groups=True, label="style").variants(e, ctx) for e in examples]
    requests, used = plan_requests(examples, separate, 0, base)
    assert used == 4 and [r.group_id for r in requests] == [0, 1, 2, 3]
    assert separate[0][0].labels == {"style": "think"}
    with pytest.raises(ValueError, match="max_new_tokens 9; it must be in 1..8"):
        plan_requests(examples[:1], [[Variant("p", 1, max_new_tokens=9)]], 0, base)


def test_sampled_variants_come_back_in_plan_order_with_labels(tiny, monkeypatch):
    model, tokenizer = tiny
    examples, _ = prompts_for(tokenizer)
    engine = CachedEngine(model, tokenizer)
    calls: list[SamplingParams] = []
    original = engine.generate

    def spy(*args, **kw):
        calls.append(args[3])
        return original(*args, **kw)

    monkeypatch.setattr(engine, "generate", spy)
    ctx = RolloutContext(build_template(TemplateConfig()), tokenizer, 4)
    halves = Prefixes([{"name": "think", "prefix": THINK}, {"name": "fast", "prefix": "/no_think\n"}])
    requests, _ = plan_requests(
        examples, [halves.variants(e, ctx) for e in examples], 0, SamplingParams(4, 8)
    )
    batch = sample_requests(engine, requests)
    assert len(calls) == 1  # equal sampling settings: both modes decode in one batch
    assert [c.labels["mode"] for c in batch] == ["think", "think", "fast", "fast"] * 2
    assert [c.group_id for c in batch] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(c.text.startswith(THINK if c.labels["mode"] == "think" else "/no_think\n") for c in batch)
    requests, _ = plan_requests(
        examples, [two_modes().variants(e, ctx) for e in examples], 0, SamplingParams(4, 8)
    )
    batch = sample_requests(engine, requests)
    assert len(calls) == 3  # the fast mode's own max_new_tokens: a call of its own
    assert [c.labels["mode"] for c in batch] == ["think"] * 3 + ["fast"] + ["think"] * 3 + ["fast"]
    assert all(c.length <= 7 for c in batch if c.labels["mode"] == "fast")


def test_plain_strategy_is_one_generate_call_as_before(tiny):
    model, tokenizer = tiny
    examples, prompts = prompts_for(tokenizer)
    params = SamplingParams(3, 6, 1.0)
    torch.manual_seed(1)
    before = CachedEngine(model, tokenizer).generate(examples, prompts, [5, 6], params)
    ctx = RolloutContext(build_template(TemplateConfig()), tokenizer, 3)
    requests, used = plan_requests(examples, [Plain().variants(e, ctx) for e in examples], 5, params)
    torch.manual_seed(1)
    after = sample_requests(CachedEngine(model, tokenizer), requests)
    assert used == 2
    assert [(c.group_id, c.completion_ids, c.labels) for c in after] == [
        (c.group_id, c.completion_ids, {}) for c in before
    ]


def test_reward_by_label_only_where_labels_exist(tiny):
    model, tokenizer = tiny
    examples, prompts = prompts_for(tokenizer, 1)
    batch = CachedEngine(model, tokenizer).generate(examples, prompts, [0], SamplingParams(3, 2))
    assert reward_by_label(batch, [1.0, 2.0, 3.0]) == {}
    for c, mode in zip(batch, ["a", "a", "b"], strict=True):
        c.labels["mode"] = mode
    assert reward_by_label(batch, [1.0, float("nan"), 3.0]) == {
        "count/by_mode/a": 2.0,
        "reward/by_mode/a": 1.0,
        "count/by_mode/b": 1.0,
        "reward/by_mode/b": 3.0,
    }


RECIPE = """
model: {name: tiny-random}
data: {source: task:chain_sum, size: 8, task_args: {min_terms: 2, max_terms: 2}}
generation: {num_generations: 4, prompts_per_step: 2, max_new_tokens: 8}
rewards: [{name: test-prefix-even}]
rl: {steps: 2}
optim: {lr: 1.0e-3}
"""

MODES = (
    'rollout: {name: prefixes, args: {modes: [{name: think, prefix: "<think>\\n"}, '
    '{name: fast, prefix: "/no_think\\n", max_new_tokens: 7}]}}\n'
)


@pytest.fixture
def even_reward(monkeypatch):
    """A reward that varies within groups (share of even token ids), registered for one test."""
    from incentive.rewards.base import REWARDS, Reward, RewardResult

    monkeypatch.setattr(REWARDS, "_items", dict(REWARDS._items))

    @REWARDS.register("test-prefix-even")
    class Even(Reward):
        def __call__(self, batch, ctx):
            return RewardResult([sum(t % 2 == 0 for t in c.completion_ids) / max(1, c.length) for c in batch])


def test_rl_steps_train_on_forced_prefixes_and_log_rewards_by_mode(tiny, tmp_path, monkeypatch, even_reward):
    _, tokenizer = tiny
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE + MODES)
    batches = []
    original = RLTrainer._rollout

    def keep(self, step, examples, times):
        batch, scored = original(self, step, examples, times)
        batches.append(batch)
        return batch, scored

    monkeypatch.setattr(RLTrainer, "_rollout", keep)
    run = Run(load_recipe(path), tmp_path / "run")
    run.execute()
    records = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r.get("stage") == "rl"]
    assert [r["step"] for r in rl] == [1, 2]
    for record in rl:
        assert record["count/by_mode/think"] == record["count/by_mode/fast"] == 4.0
        assert {"reward/by_mode/think", "reward/by_mode/fast"} <= set(record)
        assert {s["labels"]["mode"] for s in record["samples"]} <= {"think", "fast"}
    assert any(r["train/skipped"] == 0.0 for r in rl)
    for batch in batches:
        assert [c.group_id for c in batch][:4] == [batch.completions[0].group_id] * 4
        for c in batch:
            prefix = ids(tokenizer, THINK if c.labels["mode"] == "think" else "/no_think\n")
            assert c.completion_ids[: len(prefix)] == prefix and c.trained_mask[: len(prefix)] == [1.0] * len(
                prefix
            )
            assert c.prompt_ids == ids(tokenizer, c.prompt_text)
            assert c.length <= (8 if c.labels["mode"] == "think" else 7)


def test_names_are_checked_at_load_and_engines_that_cannot_force_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("test-prefix-even", "format"))
    with pytest.raises(ConfigError, match="unknown rollout strategy 'prefix'; did you mean 'prefixes'"):
        load_recipe(path, ["rollout.name=prefix"])
    with pytest.raises(ConfigError, match="unknown environment 'tool'; did you mean 'tools'"):
        load_recipe(path, ["environment.name=tool"])
    with pytest.raises(ConfigError, match="tools and environment are both set"):
        load_recipe(path, ["environment.name=tools", "tools.tools=[{name: crop_grid}]"])
    with pytest.raises(ConfigError, match="rollout 'prefixes': .*unexpected keyword argument 'prefx'"):
        Run(
            load_recipe(path, ["rollout={name: prefixes, args: {modes: [{name: a, prefx: x}]}}"]),
            tmp_path / "a",
        )

    class NoPrefixes(HFEngine):
        forced_prefixes = False

    monkeypatch.setattr(ENGINES, "_items", dict(ENGINES._items))
    ENGINES.register("test-no-prefixes")(NoPrefixes)
    path.write_text(path.read_text() + MODES)
    with pytest.raises(
        ConfigError, match="forces assistant prefixes, which generation.engine 'test-no-prefixes'"
    ):
        Run(load_recipe(path, ["generation.engine=test-no-prefixes"]), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert "plain" in ROLLOUT_STRATEGIES
