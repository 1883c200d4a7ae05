"""HCRMP-style hinted control: state augmentation, Beta policy, per-critic GAE and hint-weighted mixing, the
stability anchor, the semantic cache, hint sources (oracle, noisy, language model JSON), config errors, and short
end-to-end runs on a stub road and on highway-env."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.distributions import Beta

from incentive.advantages import gae as token_gae
from incentive.cli import main
from incentive.control.anchor import KnowledgeBase, StabilityAnchor
from incentive.control.cache import SemanticCache
from incentive.control.cli import RECIPES
from incentive.control.config import (
    AnchorConfig,
    CacheConfig,
    ControlRecipe,
    EnvConfig,
    HintConfig,
    RewardConfig,
)
from incentive.control.envs import ENVIRONMENTS, StubRoad, Transition, missing_modules
from incentive.control.hints import Hint, HintSource, NoisyHints, oracle_hint
from incentive.control.lm_hints import LanguageModelHints, parse_hint, prompt
from incentive.control.policy import ActorCritic, entropy, log_prob
from incentive.control.ppo import combined_advantage, gae, mix
from incentive.control.rewards import reward_components
from incentive.control.runner import Controller, Episode, train
from incentive.control.scene import Neighbour, Scene, sector
from incentive.control.state import augment, hint_features

RECIPE = RECIPES / "hcrmp.yaml"
HIGHWAY = pytest.mark.skipif(
    bool(missing_modules(ENVIRONMENTS.get("highway"))), reason="needs incentive[control] (highway-env)"
)

SCENE = Scene(
    "straight",
    3,
    1,
    24.0,
    (Neighbour(12.0, 0.0, -6.0), Neighbour(-15.0, -4.0, 2.0), Neighbour(2.0, 4.0, 0.0)),
)
"""Ego in the middle lane: a slower car 12 m ahead (TTC 2 s), one 15 m behind on the left, one beside on the right."""

HINT = Hint((0, 1, 2, 3), (0, 5, -1), (0.7, 0.2, 0.1))


# --- state augmentation -------------------------------------------------------------------------------------


def test_augmented_state_has_raw_plus_scenario_plus_sector_per_agent():
    raw = np.arange(35, dtype=np.float32)
    state = augment(raw, HINT, agents=3)
    assert state.shape == (35 + 4 + 3 * 8,)
    assert np.array_equal(state[:35], raw)
    assert state[35:39].tolist() == [0 / 3, 1 / 2, 2 / 2, 3 / 4]  # ordinal codes: index / (levels - 1)
    slots = state[39:].reshape(3, 8)
    assert slots[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # front
    assert slots[1].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]  # rear-right
    assert not slots[2].any()  # no third agent: zero padded
    assert not hint_features(None, 3).any()  # no hint: all zeros


def test_sectors_and_oracle_hint_of_a_hand_made_scene():
    assert [sector(n) for n in SCENE.neighbours] == [0, 3, 6]  # front, rear-left, right
    hint = oracle_hint(SCENE, agents=4)
    # 3 cars within 60 m: medium density; TTC 12/6 = 2 s and gap 12 m: medium risk (high needs TTC < 2 or < 10 m);
    # the right lane is taken (a car 2 m ahead), the left one free (its car is more than 10 m behind): change left
    assert hint.scenario == (0, 1, 1, 3)
    assert hint.directions == (0, 3, 6, -1)
    assert hint.weights == (0.5, 0.35, 0.15)


# --- Beta policy --------------------------------------------------------------------------------------------


def test_beta_log_prob_by_hand_and_change_of_variables():
    dist = Beta(torch.tensor([2.0, 2.0]), torch.tensor([2.0, 3.0]))
    action = torch.tensor([0.0, 0.5])  # u = 0.5 and 0.75
    # Beta(2,2) at 0.5: 6·0.5·0.5 = 1.5; Beta(2,3) at 0.75: 12·0.75·0.25² = 0.5625; each / 2 for a = 2u − 1
    expected = math.log(1.5 / 2) + math.log(0.5625 / 2)
    assert log_prob(dist, action).item() == pytest.approx(expected, abs=1e-6)
    # H = ln B(α,β) − (α−1)ψ(α) − (β−1)ψ(β) + (α+β−2)ψ(α+β): −0.12513 for Beta(2,2), −0.23490 for Beta(2,3);
    # plus ln 2 per dimension for a = 2u − 1
    assert entropy(dist).item() == pytest.approx(-0.12513 - 0.23490 + 2 * math.log(2), abs=1e-4)


def test_beta_policy_actions_in_range_and_log_probs_finite_at_the_bounds():
    torch.manual_seed(0)
    model = ActorCritic(10, 16, init_concentration=4.0)
    with torch.no_grad():
        dist = model.distribution(torch.zeros(10))
    assert dist.concentration1.tolist() == pytest.approx([4.0, 4.0], abs=0.05)
    actions = 2 * dist.sample((2000,)) - 1
    assert actions.shape == (2000, 2) and actions.min() >= -1 and actions.max() <= 1
    edges = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])
    assert torch.isfinite(log_prob(dist, edges)).all() and torch.isfinite(entropy(dist))
    assert model.values(torch.zeros(4, 10)).shape == (4, 3)


# --- GAE per critic and the hint-weighted mix ---------------------------------------------------------------


REWARDS = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
VALUES = np.array([[0.5, 1.0], [1.0, 0.0], [0.0, 2.0]])


def test_gae_per_critic_by_hand():
    nexts = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # V(s_{t+1}); 0 after the terminal step
    adv, ret = gae(REWARDS, VALUES, nexts, np.array([False, False, True]), gamma=0.5, lam=0.5)
    assert adv[:, 0].tolist() == [0.875, -0.5, 2.0]
    assert adv[:, 1].tolist() == [-0.625, 1.5, -2.0]
    assert ret.tolist() == [[1.375, 0.375], [0.5, 1.5], [2.0, 0.0]]
    # the token-level GAE gives the same numbers for one terminating episode
    rewards, values = torch.tensor(REWARDS[None, :, 0]), torch.tensor(VALUES[None, :, 0])
    token_adv, _ = token_gae(rewards, values, torch.ones(1, 3), 0.5, 0.5)
    assert token_adv[0].tolist() == adv[:, 0].tolist()


def test_gae_restarts_at_an_episode_end_and_bootstraps_a_cut_rollout():
    nexts = np.array([[0.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    adv, _ = gae(REWARDS, VALUES, nexts, np.array([True, False, False]), gamma=0.5, lam=0.5)
    assert adv[:, 0].tolist() == [0.5, -0.375, 2.5]  # step 0 ended its episode: no carry from step 1


def test_mix_is_the_hint_weighted_sum_of_critic_advantages():
    adv = np.array([[1.0, 2.0, 6.0], [4.0, 0.0, 2.0]])
    assert mix(adv, np.array([[0, 1, 0], [0, 1, 0]])).tolist() == [2.0, 0.0]  # one-hot: critic 1 exactly
    assert mix(adv, np.full((2, 3), 1 / 3)) == pytest.approx([3.0, 2.0])  # uniform: the mean
    assert mix(adv, np.array([[2, 0, 2], [2, 0, 2]])).tolist() == [3.5, 3.0]  # renormalised to the simplex
    assert mix(adv, np.array([[1, 0, 0], [0, 0, 1]])).tolist() == [1.0, 2.0]  # each step its own weights
    assert combined_advantage(adv, np.array([[0, 1, 0], [0, 1, 0]]), "none").tolist() == [2.0, 0.0]
    assert combined_advantage(adv, np.array([[0, 1, 0], [0, 1, 0]]), "per_critic").tolist() == pytest.approx([1, -1])


class FixedHints(HintSource):
    """Always the same hint (weights given), counting calls."""

    def __init__(self, weights=(1.0, 0.0, 0.0), hint=None):
        super().__init__(HintConfig(), 0)
        self.fixed = hint or Hint((0, 1, 0, 0), (0, 4, -1), weights)

    def hint(self, scene, context=""):
        self.counts["calls"] += 1
        return self.fixed


def stub_recipe(**sections) -> ControlRecipe:
    base = {
        "env": {"name": "stub", "vehicles": 6, "duration": 8, "lanes": 2},
        "ppo": {"total_steps": 32, "rollout_steps": 32, "minibatch": 16, "epochs": 1, "hidden": 16},
        "eval": {"episodes": 2},
        "anchor": {"enabled": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return ControlRecipe.model_validate(base)


def captured_batches(monkeypatch, recipe, source, tmp_path):
    seen = []

    def record(model, optimizer, batch, config):
        seen.append(batch)
        return {}

    monkeypatch.setattr("incentive.control.runner.update", record)
    train(recipe, tmp_path, log=lambda _: None, controller=Controller(recipe, source=source))
    return seen[0]


def test_trainer_mixes_critics_by_the_hinted_weights(monkeypatch, tmp_path):
    """Same seed and same hint features, only the hinted weights differ: the rollouts are identical, and the
    actor's advantages must follow the weights (a trainer that ignored the hints would give equal ones)."""
    recipe = stub_recipe(ppo={"normalize": "none"})
    safety = captured_batches(monkeypatch, recipe, FixedHints((1, 0, 0)), tmp_path / "a")
    speed = captured_batches(monkeypatch, recipe, FixedHints((0, 1, 0)), tmp_path / "b")
    both = captured_batches(monkeypatch, recipe, FixedHints((0.5, 0.5, 0)), tmp_path / "c")
    assert torch.equal(safety.states, speed.states) and torch.equal(safety.actions, speed.actions)
    assert not torch.allclose(safety.advantages, speed.advantages)
    assert torch.allclose(both.advantages, (safety.advantages + speed.advantages) / 2, atol=1e-5)


# --- contextual stability anchor ----------------------------------------------------------------------------


def anchor_with(**config) -> StabilityAnchor:
    base = KnowledgeBase(capacity=10)
    base.add((0, 1, 1, 0), (0.6, 0.3, 0.1))
    base.add((0, 1, 1, 0), (0.4, 0.5, 0.1))
    base.add((0, 2, 2, 2), (0.9, 0.05, 0.05))
    return StabilityAnchor(AnchorConfig(**config), base)


def test_knowledge_base_finds_an_identical_scenario_with_similarity_one():
    near = anchor_with().base.nearest((0, 1, 1, 0), m=3)
    assert [round(s, 6) for s, _ in near] == [1.0, 1.0, 0.25]  # one-hot codes: share of matching categories
    assert near[0][1].tolist() == [0.4, 0.5, 0.1]  # ties: newest first


def test_anchor_blends_toward_the_mean_of_similar_validated_weights():
    hint = Hint((0, 1, 1, 0), (), (0.2, 0.6, 0.2))
    out = anchor_with(strength=0.5)(hint)  # anchor = mean((.6,.3,.1), (.4,.5,.1)) = (.5, .4, .1)
    assert out.status == "blend" and out.anchor == pytest.approx((0.5, 0.4, 0.1))
    assert out.weights == pytest.approx((0.35, 0.5, 0.15))
    assert anchor_with(strength=1.0)(hint).weights == pytest.approx((0.5, 0.4, 0.1))  # λ = 1: the anchor
    assert anchor_with(strength=0.0)(hint).weights == pytest.approx(hint.weights)
    assert anchor_with(top_m=1, strength=1.0)(hint).weights == pytest.approx((0.4, 0.5, 0.1))  # m = 1: nearest


def test_anchor_passes_dissimilar_scenarios_and_rejects_far_hints():
    far_scene = Hint((0, 1, 1, 1), (), (0.2, 0.6, 0.2))  # 3 of 4 categories match: similarity 0.75
    out = anchor_with(threshold=0.9)(far_scene)
    assert out.status == "pass" and out.weights == far_scene.weights and out.similarity == pytest.approx(0.75)
    assert anchor_with(threshold=0.7, strength=1.0)(far_scene).status == "blend"
    hint = Hint((0, 1, 1, 0), (), (0.2, 0.6, 0.2))  # distance to the anchor: sqrt(.09 + .04 + .01) = 0.374
    rejected = anchor_with(reject_distance=0.3)(hint)
    assert rejected.status == "reject" and rejected.weights == pytest.approx((0.5, 0.4, 0.1))
    assert anchor_with(reject_distance=0.5)(hint).status == "blend"
    assert anchor_with().counts == Counter()
    assert StabilityAnchor(AnchorConfig(), KnowledgeBase(4))(hint).status == "pass"  # empty base


def test_rag_context_lists_the_validated_weights():
    text = anchor_with().context((0, 1, 1, 0))
    assert "safety 0.40, efficiency 0.50, comfort 0.10" in text and "similarity 1.00" in text
    assert anchor_with().context((1, 0, 0, 1)) == ""


# --- semantic cache ---------------------------------------------------------------------------------------


def served(cache, steps, scene=SCENE):
    return [cache.serve(t, scene) for t in range(steps)]


def test_cache_queries_every_period_and_serves_from_cache_in_between():
    source = FixedHints()
    cache = SemanticCache(CacheConfig(query_period=10, ttl=50), source, agents=3)
    out = served(cache, 25)
    assert source.counts["calls"] == 3  # steps 0, 10, 20
    assert [s.origin for s in out[:11]] == ["call"] + ["cache"] * 9 + ["call"]
    assert all(s.hint is source.fixed for s in out)
    assert cache.counts["hits"] == 22 and cache.counts["calls"] == 3 and cache.counts["steps"] == 25
    cache.reset()  # a new episode queries at once
    assert cache.serve(0, SCENE).origin == "call" and source.counts["calls"] == 4


def test_cache_expires_a_hint_after_its_ttl_and_falls_back():
    cache = SemanticCache(CacheConfig(query_period=10, ttl=5), FixedHints(), agents=3)
    out = served(cache, 12)
    assert [s.valid for s in out] == [True] * 5 + [False] * 5 + [True] * 2
    assert out[7].origin == "fallback" and not augment(np.zeros(2), out[7].hint, 3)[2:].any()
    assert cache.counts["fallbacks"] == 5


def test_a_source_without_an_answer_keeps_the_last_hint_until_its_ttl():
    class Flaky(FixedHints):
        def hint(self, scene, context=""):
            self.counts["calls"] += 1
            return self.fixed if self.counts["calls"] == 1 else None

    cache = SemanticCache(CacheConfig(query_period=4, ttl=6), Flaky(), agents=3)
    out = served(cache, 8)
    assert [s.valid for s in out] == [True] * 6 + [False] * 2  # the failed call at step 4 left the old hint


def test_cache_reuses_the_hint_of_a_similar_scene_without_asking():
    source = FixedHints()
    cache = SemanticCache(CacheConfig(query_period=10, reuse_similarity=0.99), source, agents=3)
    first = cache.serve(0, SCENE)
    cache.reset()
    again = cache.serve(0, SCENE)
    assert again.origin == "reuse" and again.hint is first.hint and source.counts["calls"] == 1
    cache.reset()
    other = Scene("straight", 3, 0, 10.0, (Neighbour(-30.0, 4.0, 5.0),))
    assert cache.serve(0, other).origin == "call" and source.counts["calls"] == 2


# --- hint sources ---------------------------------------------------------------------------------------------


def random_scenes(count: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [
        Scene(
            "straight",
            3,
            int(rng.integers(3)),
            float(rng.uniform(15, 30)),
            tuple(Neighbour(*rng.uniform([-50, -8, -8], [50, 8, 8])) for _ in range(rng.integers(1, 8))),
        )
        for _ in range(count)
    ]


def test_noisy_hints_flip_at_their_rate_with_a_seed():
    scenes = random_scenes(300)
    clean = NoisyHints(HintConfig(noise_rate=0.0), seed=1)
    assert all(clean.hint(s) == oracle_hint(s, 3) for s in scenes)
    always = NoisyHints(HintConfig(noise_rate=1.0), seed=1)
    for s in scenes:
        wrong, truth = always.hint(s), oracle_hint(s, 3)
        assert all(a != b for a, b in zip(wrong.scenario, truth.scenario, strict=True))
        assert all(a != b for a, b in zip(wrong.directions, truth.directions, strict=True) if b >= 0)
        assert wrong.weights != truth.weights and sum(wrong.weights) == pytest.approx(1)
    many = random_scenes(2000, seed=2)
    noisy = NoisyHints(HintConfig(noise_rate=0.3), seed=7)
    flips = [noisy.hint(s) != oracle_hint(s, 3) for s in many]
    assert 0.27 < np.mean(flips) < 0.33 and noisy.counts["corrupted"] == sum(flips)
    repeat = NoisyHints(HintConfig(noise_rate=0.3), seed=7)
    assert [repeat.hint(s) != oracle_hint(s, 3) for s in many] == flips
    other = NoisyHints(HintConfig(noise_rate=0.3), seed=8)
    assert [other.hint(s) != oracle_hint(s, 3) for s in many] != flips


GOOD = (
    'Sure! Here is my rating:\n```json\n{"road": "straight", "density": "Medium", "risk": "high", '
    '"manoeuvre": "slow down", "agents": ["front", "rear-left"], '
    '"weights": {"safety": 6, "efficiency": 3, "comfort": 1}}\n```'
)


def test_lm_hint_json_is_parsed_from_prose_and_normalised():
    hint, problem = parse_hint(GOOD, SCENE, agents=3)
    assert problem is None
    assert hint == Hint((0, 1, 2, 2), (0, 3, -1), (0.6, 0.3, 0.1))
    listed, _ = parse_hint('{"density": "low", "risk": "low", "manoeuvre": "keep", "weights": [1, 1, 2]}', SCENE, 2)
    assert listed == Hint((0, 0, 0, 0), (-1, -1), (0.25, 0.25, 0.5))  # road from the scene, no agents listed


def test_lm_hint_cut_off_by_the_token_limit_is_read_up_to_its_last_whole_field():
    looping = (
        '{"road": "straight", "density": "high", "risk": "high", "manoeuvre": "slow_down", "agents": ["front"], '
        '"weights": {"safety": 0.6, "efficiency": 0.2, "comfort": 0.2}, "manoeuvre": "slow_down", "agents": ["fr'
    )
    hint, problem = parse_hint(looping, SCENE, agents=2)
    assert problem is None and hint == Hint((0, 2, 2, 2), (0, -1), (0.6, 0.2, 0.2))


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("I think the risk is high.", "bad_json"),
        ('{"density": "lo', "bad_json"),
        ('{"density": "low", "risk": "low", "manoeuvre": "keep", "weights": [1, 1, 2]', "bad_fields"),
        ("[1, 2, 3]", "bad_json"),
        ('{"density": "huge", "risk": "low", "manoeuvre": "keep", "weights": [1, 1, 1]}', "bad_fields"),
        ('{"density": "low", "risk": "low", "manoeuvre": "keep", "weights": [1, -1, 1]}', "bad_fields"),
        ('{"density": "low", "risk": "low", "manoeuvre": "keep", "weights": [1, 1]}', "bad_fields"),
        ('{"density": "low", "risk": "low", "manoeuvre": "keep", "weights": [0, 0, 0]}', "bad_fields"),
        ('{"density": "low", "risk": "low", "manoeuvre": "keep", "agents": ["up"], "weights": [1, 1]}', "bad_fields"),
        ('{"density": "low", "risk": "low", "weights": [1, 1, 1]}', "bad_fields"),
    ],
)
def test_lm_hint_bad_answers_give_no_hint_and_say_why(answer, problem):
    assert parse_hint(answer, SCENE, agents=3) == (None, problem)


def test_lm_hint_source_counts_its_fallbacks_and_sends_the_retrieved_context():
    answers = iter([GOOD, "not json at all", '{"risk": 3}'])
    prompts = []

    def fake(batch):
        prompts.extend(batch)
        return [next(answers)]

    source = LanguageModelHints(HintConfig(), seed=0, complete=fake)
    assert source.hint(SCENE, "Weights that worked: safety 0.9") is not None
    assert source.hint(SCENE) is None and source.hint(SCENE) is None
    assert source.counts == Counter(calls=3, fallbacks=2, bad_json=1, bad_fields=1)
    assert "12 m ahead" in prompts[0] and "Weights that worked" in prompts[0] and '"weights"' in prompts[0]
    assert prompts[0] == prompt(SCENE, 3, "Weights that worked: safety 0.9")


# --- environment contract and rewards -------------------------------------------------------------------------


def test_stub_road_ends_on_a_crash_with_the_collision_penalty_as_safety_reward():
    env = StubRoad(EnvConfig(name="stub", vehicles=0, lanes=1))
    env.reset(0)
    env.others = np.array([[20.0, env.ego[1], 5.0]])  # a slow car 20 m ahead in the ego's lane
    previous = np.zeros(2)
    for _ in range(20):
        action = np.array([1.0, 0.0])
        step = env.step(action)
        rewards = reward_components(step, env.scene(), action, previous, RewardConfig(collision_penalty=1.5))
        previous = action
        if step.terminated:
            break
    assert step.crashed and step.terminated and not step.truncated
    assert rewards[0] == -1.5


def test_reward_components_by_hand():
    step = Transition(np.zeros(1), False, False, False, False, 25.0)
    rewards = reward_components(step, SCENE, np.array([0.5, -0.5]), np.array([0.0, 0.5]), RewardConfig())
    # TTC 2 s: −0.5·(1 − 2/4); speed 25 in [20, 30]: 0.5; comfort −0.5·mean(0.5, 1.0)
    assert rewards.tolist() == pytest.approx([-0.25, 0.5, -0.375])
    off_centre = Scene("straight", 3, 1, 25.0, (), offset=-1.0)  # no one ahead; half of half a lane off: −0.1·0.5
    assert reward_components(step, off_centre, np.zeros(2), np.zeros(2), RewardConfig())[0] == pytest.approx(-0.05)


@HIGHWAY
def test_highway_env_contract_actions_and_crash_termination():
    from incentive.control.envs import HighwayEnv

    env = HighwayEnv(EnvConfig(vehicles=20, density=2.0, duration=30))
    assert env.env.action_space.shape == (2,)
    obs = env.reset(3)
    assert obs.shape == (env.observation_size,) == (5 * 7,)
    previous = np.zeros(2)
    for _ in range(60):
        action = np.array([1.0, 0.0])  # full throttle into traffic
        step = env.step(action)
        rewards = reward_components(step, env.scene(), action, previous, RewardConfig())
        previous = action
        if step.terminated or step.truncated:
            break
    assert step.crashed and step.terminated
    assert rewards[0] == -RewardConfig().collision_penalty
    env.close()


# --- configuration and command line ---------------------------------------------------------------------------


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("ppo.bogus=1", "ppo.bogus: unknown key"),
        ("cache.ttl=0", "cache.ttl = 0: should be greater than or equal to 1"),
        ("hints.source=oracel", "did you mean 'oracle'?"),
        ("hints.noise_rate=1.5", "hints.noise_rate = 1.5"),
        ("ppo.minibatch=512", "ppo.minibatch (512) is larger than ppo.rollout_steps (256)"),
        ("rewards.speed_range=[30, 20]", "speed_range must be [low, high]"),
    ],
)
def test_bad_config_is_one_error_line_naming_key_and_value(setting, expected, tmp_path, capsys):
    assert main(["control", str(RECIPE), "--set", setting, "--run-dir", str(tmp_path / "run")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert expected in line, line
    assert not (tmp_path / "run").exists()


def test_missing_simulator_is_refused_before_anything_loads(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("incentive.control.envs.missing_modules", lambda env: ["highway_env"])
    monkeypatch.setattr("incentive.control.runner.train", lambda *a, **k: pytest.fail("training started"))
    assert main(["control", "hcrmp", "--run-dir", str(tmp_path / "run")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "pip install 'incentive[control]'" in line and not (tmp_path / "run").exists()


# --- end to end -----------------------------------------------------------------------------------------------


def test_stub_run_is_deterministic_and_writes_metrics(tmp_path):
    recipe = stub_recipe(hints={"source": "noisy", "noise_rate": 0.5}, anchor={"enabled": True})
    first = train(recipe, tmp_path / "a", log=lambda _: None)
    second = train(recipe, tmp_path / "b", log=lambda _: None)
    assert first == second
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("update") for x in lines] == [1, None] and lines[-1]["event"] == "eval"
    for key in ("success_rate", "collision_rate", "mean_speed", "hint_call_rate", "cache_hit_rate"):
        assert key in first
    assert first["hint_call_rate"] + first["cache_hit_rate"] == pytest.approx(1.0)
    assert first["source"]["corrupted"] > 0
    assert (tmp_path / "a" / "policy.pt").exists() and (tmp_path / "a" / "kb.json").exists()


def test_stub_run_without_hints_uses_the_fallback_throughout(tmp_path):
    result = train(stub_recipe(hints={"source": "none"}), tmp_path, log=lambda _: None)
    assert result["fallback_rate"] == 1.0 and result["hint_call_rate"] == 0.0 and result["cache_hit_rate"] == 0.0


def test_an_episode_that_stops_or_reverses_until_the_time_limit_is_no_success():
    """Braking to a stop (or reversing, which highway-env allows) avoids every crash; only an episode that also
    drives at env.success_min_speed on average counts as a success."""
    controller = Controller(stub_recipe(hints={"source": "none"}, env={"success_min_speed": 10.0}))
    for speed, expected in ((25.0, True), (10.0, True), (9.9, False), (0.0, False), (-5.0, False)):
        episode = Episode()
        for t in range(4):
            step = Transition(np.zeros(1, dtype=np.float32), False, False, False, t == 3, speed)
            episode.record(step, np.zeros(3), np.zeros(2), None)
        assert controller.finish(episode, step, learn=False)["success"] is expected, speed


@HIGHWAY
def test_control_command_on_highway_env(tmp_path, capsys):
    sets = [
        "ppo.total_steps=16",
        "ppo.rollout_steps=16",
        "ppo.minibatch=8",
        "ppo.epochs=1",
        "eval.episodes=1",
        "env.duration=5",
    ]
    args = ["control", "hcrmp", "--run-dir", str(tmp_path / "run"), *(x for s in sets for x in ("--set", s))]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[control] update 1/1" in out and "[control] eval over 1 episodes" in out
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["episodes"] == 1 and 0 <= result["success_rate"] <= 1
    assert main(args) == 2  # the folder exists now
    assert "--overwrite" in capsys.readouterr().err
