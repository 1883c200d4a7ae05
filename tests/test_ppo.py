"""PPO with a critic: per-token rewards and GAE by hand (step rewards, a masked observation span), the clipped
value loss by hand, the critic's values and checkpoint, the recipe checks, resume, and reward going up."""

import copy
import io
import json
import math

import pytest
import torch

from incentive.advantages import ADVANTAGES, GAE, Estimator, gae, masked_whiten, token_rewards
from incentive.config import ConfigError, CriticConfig, OptimConfig, load_recipe
from incentive.data.example import Example
from incentive.losses import clipped_value_loss
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import Completion, RolloutBatch
from incentive.run import Run
from incentive.training.batch import TrainingBatch
from incentive.training.critic import Critic, PolicyHead, SeparateModel, last_hidden
from incentive.training.rl import RLTrainer


@REWARDS.register("test-ppo-digit-share")
class DigitShare(Reward):
    """Share of digit characters: a tiny model after a short SFT raises it within a few RL steps."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        return RewardResult([sum(ch.isdigit() for ch in c.text) / max(1, len(c.text)) for c in batch])


@REWARDS.register("test-ppo-even-tokens")
class EvenTokens(Reward):
    """Share of completion tokens with an even id."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        return RewardResult([sum(t % 2 == 0 for t in c.completion_ids) / max(1, c.length) for c in batch])


def training_batch(
    completions: list[Completion], scores: list[float], mask_truncated: bool = False
) -> TrainingBatch:
    return TrainingBatch.from_rollouts(RolloutBatch(completions), scores, mask_truncated)


EX = Example("1 + 1 =", "2")


def test_gae_by_hand_skips_a_masked_observation_span():
    # tokens 2 and 3 are a tool's output: the recursion steps from token 4 straight back to token 1
    rewards = torch.tensor([[0.0, 0.3, 0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 9.0, 9.0, 0.8]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    a4 = 1.0 - 0.8
    a1 = 0.3 + 0.9 * 0.8 - 0.6 + 0.9 * 0.8 * a4
    a0 = 0.0 + 0.9 * 0.6 - 0.5 + 0.9 * 0.8 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, 0.0, 0.0, a4])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.6, 0.0, 0.0, a4 + 0.8])
    # γ = λ = 1: every policy token's return is the reward still to come
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([1.3, 1.3, 0.0, 0.0, 1.0])
    assert adv[0].tolist() == pytest.approx([0.8, 0.7, 0.0, 0.0, 0.2])


def test_token_rewards_put_the_score_last_and_step_rewards_on_policy_tokens():
    tool = Completion(0, EX, "", [1], [5, 6, 7, 8, 9], "", loss_mask=[1, 1, 0, 0, 1])
    tool.step_rewards = {3: 0.1, 1: 0.2, 0: -0.5}  # token 3 is the tool's: its reward goes to token 1
    opens_with_tool = Completion(0, EX, "", [1], [5, 6, 7], "", loss_mask=[0, 1, 1], step_rewards={0: 0.4})
    failed = Completion(0, EX, "", [1], [5, 6], "", step_rewards={0: 3.0})
    batch = training_batch([tool, opens_with_tool, failed], [1.0, 0.5, math.nan])
    batch.step_rewards = [c.step_rewards for c in (tool, opens_with_tool, failed)]
    rewards = token_rewards(batch)
    assert rewards[0].tolist() == pytest.approx([-0.5, 0.3, 0.0, 0.0, 1.0])
    assert rewards[1].tolist() == pytest.approx([0.0, 0.4, 0.5, 0.0, 0.0])  # none before: the first after
    assert rewards[2].tolist() == [0.0] * 5
    batch.step_rewards[0] = {5: 1.0}
    with pytest.raises(ValueError, match="token 5 of a completion of 5 tokens"):
        token_rewards(batch)


def test_gae_estimator_whitens_over_the_batchs_policy_tokens_and_writes_returns():
    comps = [
        Completion(0, EX, "", [1], [5, 6, 7], "", loss_mask=[1, 0, 1]),
        Completion(1, EX, "", [1], [5, 6], ""),
        Completion(2, EX, "", [1], [5, 6, 7, 8], "", truncated=True),
    ]
    batch = training_batch(comps, [1.0, 0.0, 1.0], mask_truncated=True)
    batch.values = torch.tensor([[0.2, 5.0, 0.4, 0.0], [0.1, 0.3, 0.0, 0.0], [0.0] * 4])
    estimator = GAE(gamma=1.0, lam=1.0)
    assert estimator.needs == {"values", "step_rewards"} and estimator.min_group_size == 1
    raw = torch.tensor([[0.8, 0.0, 0.6, 0.0], [-0.1, -0.3, 0.0, 0.0], [0.0] * 4], dtype=torch.float64)
    trained = torch.tensor([[1.0, 0, 1, 0], [1, 1, 0, 0], [0] * 4], dtype=torch.float64)
    batch.set_advantages(estimator.estimate(batch))
    torch.testing.assert_close(batch.advantages, masked_whiten(raw, trained).float())
    picked = batch.advantages[trained.bool()]
    assert float(picked.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(picked.std(correction=0)) == pytest.approx(1.0, abs=1e-5)
    assert batch.returns.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0] * 4]
    assert batch.sequence_advantages.tolist() == pytest.approx(
        [float(picked[:2].mean()), float(picked[2:].mean()), 0]
    )


def test_a_sequence_estimator_is_repeated_over_each_rows_tokens():
    comps = [
        Completion(0, EX, "", [1], [5, 6, 7], "", loss_mask=[1, 0, 1]),
        Completion(0, EX, "", [1], [5], ""),
    ]
    batch = training_batch(comps, [1.0, 0.0])
    estimator = ADVANTAGES.get("dr_grpo")()
    assert estimator.needs == frozenset() and estimator.min_group_size == 2
    batch.set_advantages(estimator.estimate(batch))
    assert batch.advantages.tolist() == [[0.5, 0.5, 0.5], [-0.5, 0.0, 0.0]]
    assert batch.sequence_advantages.tolist() == [0.5, -0.5]


def test_an_estimator_may_only_need_what_the_trainer_supplies():
    with pytest.raises(TypeError, match="'critic_logits'"):

        class Greedy(Estimator):
            needs = frozenset({"values", "critic_logits"})

            def estimate(self, batch):
                return batch.scores


def test_the_clipped_value_loss_by_hand():
    values = torch.tensor([1.0, 0.0, 0.6, 1.0, 1.0], requires_grad=True)
    old = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
    returns = torch.tensor([2.0, -1.0, 2.0, 0.9, 0.0])
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.2)
    # V moved past V_old ± 0.2: the clipped value (0.7, 0.3) is further from R, so its error counts
    expected = [0.5 * 1.3**2, 0.5 * 1.3**2, 0.5 * 1.4**2, 0.5 * 0.2**2, 0.5 * 1.0**2]
    assert loss.tolist() == pytest.approx(expected)
    assert clipped.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    loss.sum().backward()
    # a clipped term has no gradient: the critic cannot gain by moving V further
    assert values.grad.tolist() == pytest.approx([0.0, 0.0, 0.6 - 2.0, 0.0, 1.0])
    plain, none = clipped_value_loss(values.detach(), old, returns, clip=None)
    assert plain.tolist() == pytest.approx([0.5, 0.5, 0.98, 0.005, 0.5])
    assert none.tolist() == [0.0] * 5


def test_a_head_on_the_policy_reads_the_hidden_state_before_each_token(tiny):
    model, _ = tiny
    policy = copy.deepcopy(model)
    head = PolicyHead(policy)
    assert head.values([[3, 4]], [[5, 6, 7]], [0])[0].tolist() == [0.0, 0.0, 0.0]  # a zero head at first
    torch.nn.init.normal_(head.head.weight, generator=torch.Generator().manual_seed(0))
    contexts, targets = [[3, 4], [9, 10, 11, 12]], [[5, 6, 7], [13]]
    got = head.values(contexts, targets, [0, 1])
    with torch.no_grad():
        alone = [
            policy.model(input_ids=torch.tensor([c + t])).last_hidden_state[0]
            for c, t in zip(contexts, targets, strict=True)
        ]
    want = [head.head(alone[0][1:4]).squeeze(-1), head.head(alone[1][3:4]).squeeze(-1)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert set(head.trainable()) == {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="context token"):
        last_hidden(head.body, [[]], [[5]], [0])


@pytest.mark.parametrize("kind", ["policy_head", "separate"])
def test_the_critics_state_round_trips_exactly(tiny, kind):
    model, _ = tiny
    comps = [
        Completion(0, EX, "", [3, 4], [5, 6, 7], "", loss_mask=[1, 0, 1]),
        Completion(1, EX, "", [3], [8], ""),
    ]
    batch = training_batch(comps, [1.0, 0.0])
    cfg, optim = CriticConfig(model=kind), OptimConfig()

    def critic() -> Critic:
        value_model = (
            PolicyHead(copy.deepcopy(model))
            if kind == "policy_head"
            else SeparateModel("tiny-random", cfg, None)
        )
        return Critic(value_model, cfg, optim, total_steps=4, micro_batch_tokens=64)

    first = critic()
    for _ in range(2):
        batch.values = first.values(batch)
        GAE().estimate(batch)
        stats = first.update(batch, iterations=2)
    assert stats["critic/value_loss"] > 0 and "critic/explained_variance" in stats
    second = critic()
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)  # as a checkpoint's trainer.pt holds it
    saved.seek(0)
    second.load_state_dict(torch.load(saved, weights_only=False))
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert a["scheduler"] == b["scheduler"]
    batch.values = first.values(batch)
    GAE().estimate(batch)
    first.update(batch, iterations=1)
    second.update(batch, iterations=1)
    assert all(torch.equal(first.params[k], second.params[k]) for k in first.params)


RECIPE = """
model: {name: tiny-random}
data: {source: task:chain_sum, size: 40, task_args: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}
generation: {num_generations: 1, prompts_per_step: 8, max_new_tokens: 8}
rewards: [{name: test-ppo-even-tokens}]
"""


def make_run(tmp_path, body, overrides=(), name="run", **kw):
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE + body)
    return Run(load_recipe(path, list(overrides)), tmp_path / name, **kw)


def rl_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == "rl"]


SEEN: list[TrainingBatch] = []


@ADVANTAGES.register("test-ppo-reads-reference")
class ReadsReference(Estimator):
    """Keeps the batch it was given; each completion's advantage is its score minus the batch's mean."""

    needs = frozenset({"reference_logprobs"})

    def estimate(self, batch: TrainingBatch) -> torch.Tensor:
        SEEN.append(batch)
        scores = batch.scores.nan_to_num(0.0)
        return (scores - scores.mean()).float()


def test_the_trainer_supplies_exactly_what_the_estimator_needs(tmp_path):
    make_run(tmp_path, "rl: {steps: 1}\nadvantage: {name: test-ppo-reads-reference}\n").execute()
    (batch,) = SEEN
    assert batch.values is None and batch.step_rewards is None and batch.returns is None
    assert batch.trained_rows == list(range(len(batch)))
    for i, target in enumerate(batch.targets):
        assert (batch.reference_logprobs[i, : len(target)] < 0).all()  # scored by the reference, no KL needed
        assert (batch.reference_logprobs[i, len(target) :] == 0).all()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "rl: {steps: 1}\nadvantage: {name: gae}\n",
            "advantage 'gae' needs a critic's values: add a critic section",
        ),
        ("rl: {steps: 1}\ncritic: {}\nadvantage: {name: grpo}\n", "advantage 'grpo' reads no values"),
    ],
)
def test_a_critic_exactly_when_the_estimator_reads_values(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        make_run(tmp_path, body, ["generation.num_generations=2"])


def test_critic_keys_are_checked_at_load_time(tmp_path):
    with pytest.raises(ConfigError, match="name is for model: separate"):
        make_run(tmp_path, "rl: {steps: 1}\ncritic: {model: policy_head, name: tiny-random}\n")
    with pytest.raises(ConfigError, match="critic.value_clp: unknown key; did you mean 'value_clip'"):
        make_run(tmp_path, "rl: {steps: 1}\ncritic: {value_clp: 0.1}\n")
    assert CriticConfig().learning_rate == 1e-3
    assert CriticConfig(model="separate").learning_rate == 1e-5


def comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(("time/", "throughput/"))}


@pytest.mark.parametrize(
    "critic",
    ["{model: policy_head}", "{model: separate, lora: {r: 4}, lr: 1.0e-3}"],
    ids=["head", "separate-lora"],
)
def test_resume_after_a_crash_continues_the_critic_exactly(tmp_path, crash_at, critic):
    body = f"advantage: {{name: gae}}\ncritic: {critic}\nrl: {{steps: 3, num_iterations: 2}}\noptim: {{lr: 1.0e-3}}\nrun: {{checkpoint_every: 1}}\n"
    small = ["generation.prompts_per_step=4"]
    full = make_run(tmp_path, body, small, name="full")
    full.execute()
    with crash_at(RLTrainer, 2):
        make_run(tmp_path, body, small, name="crashed").execute()
    crashed = make_run(tmp_path, body, small, name="crashed", resume=True)
    crashed.execute()

    a, b = rl_records(full.dir), rl_records(crashed.dir)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert all("critic/value_loss" in r and "critic/explained_variance" in r for r in a)
    assert [comparable(r) for r in a] == [comparable(r) for r in b]
    sa, sb = (
        torch.load(d / "checkpoints/rl-000003/trainer.pt", weights_only=False)["critic"]
        for d in (full.dir, crashed.dir)
    )
    assert sa["weights"].keys() == sb["weights"].keys()
    assert all(torch.equal(sa["weights"][k], sb["weights"][k]) for k in sa["weights"])
    assert any(float(w.abs().sum()) > 0 for w in sa["weights"].values())
    xs, ys = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert xs.keys() == ys.keys()
    assert all(torch.equal(xs[k][m], ys[k][m]) for k in xs for m in xs[k])
    assert sa["scheduler"] == sb["scheduler"]


def test_ppo_reward_goes_up_with_one_completion_per_prompt(tmp_path):
    """A short SFT, then 12 PPO steps of 16 prompts with one completion each (no group to compare with): the
    digit share rises from ~0.05 by ~0.24 on both linear backends."""
    body = "sft: {steps: 12, lr: 1.0e-2, batch_size: 8}\nrl: {steps: 12}\noptim: {lr: 2.0e-3}\n"
    body += "rewards: [{name: test-ppo-digit-share}]\ncritic: {model: policy_head}\n"
    body += "advantage: {name: gae, args: {lam: 1.0}}\n"
    run = make_run(tmp_path, body, ["generation.prompts_per_step=16", "generation.max_new_tokens=12"])
    run.execute()
    records = rl_records(run.dir)
    rewards = [r["reward/mean"] for r in records]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1, rewards
    assert all(r["train/skipped"] == 0 and "critic/explained_variance" in r for r in records)
