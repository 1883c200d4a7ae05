import json
import math

import pytest
import torch

from incentive.config import ConfigError, LossConfig, load_recipe
from incentive.losses import (
    AGGREGATIONS,
    CISPO,
    GSPO,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    Clipped,
    DualClip,
    Totals,
    build_policy_loss,
    own_keys,
)
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch
from incentive.run import Run

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
TOTALS = Totals(tokens=4, sequences=2)


def test_aggregations_hand_computed():
    assert float(AGGREGATIONS.get("token-mean")(LOSS, MASK, TOTALS, 1.0)) == pytest.approx(2.5)
    assert float(AGGREGATIONS.get("seq-mean-token-mean")(LOSS, MASK, TOTALS, 1.0)) == pytest.approx(3.0)
    assert float(AGGREGATIONS.get("constant")(LOSS, MASK, TOTALS, 4.0)) == pytest.approx(1.25)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "constant"])
def test_micro_batches_sum_to_the_whole(mode):
    agg = AGGREGATIONS.get(mode)
    whole = agg(LOSS, MASK, TOTALS, 4.0)
    parts = agg(LOSS[:1], MASK[:1], TOTALS, 4.0) + agg(LOSS[1:], MASK[1:], TOTALS, 4.0)
    assert float(parts) == pytest.approx(float(whole))


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([0.0]), torch.tensor([math.log(2)])
    assert float(KL_ESTIMATORS.get("k1")(logp, ref)) == pytest.approx(-0.693147, rel=1e-5)
    assert float(KL_ESTIMATORS.get("k2")(logp, ref)) == pytest.approx(0.240227, rel=1e-5)
    assert float(KL_ESTIMATORS.get("k3")(logp, ref)) == pytest.approx(0.306853, rel=1e-5)
    same = torch.tensor([-1.3])
    assert float(KL_ESTIMATORS.get("k3")(same, same)) == 0.0


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected"),
    [(1.5, 1.0, -1.28), (1.5, -1.0, 1.5), (0.5, 1.0, -0.5), (0.5, -1.0, 0.8), (1.0, 2.0, -2.0)],
)
def test_clipped_surrogate_low_high(ratio, advantage, expected):
    loss_fn = Clipped(eps_low=0.2, eps_high=0.28)
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio))
    loss, _ = loss_fn(logp, old, torch.tensor([advantage]), torch.ones(1, 1), Totals(1, 1))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_clip_fraction_counts_clipped_tokens():
    loss_fn = Clipped(eps_low=0.2, eps_high=0.2)
    logp = torch.log(torch.tensor([[1.5, 1.0]]))
    _, stats = loss_fn(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), Totals(2, 1))
    assert stats["clip_frac"] == pytest.approx(0.5)


def test_on_policy_gradient_is_minus_advantage_over_tokens():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, _ = Clipped()(logp, logp.detach(), adv, mask, Totals(3, 2))
    loss.backward()
    expected = torch.tensor([[-2.0, -2.0], [1.0, 0.0]]) / 3
    assert torch.allclose(logp.grad, expected)


def test_kl_penalty_added_and_needs_reference():
    logp = torch.zeros(1, 1)
    ref = torch.full((1, 1), math.log(2))
    loss, stats = Clipped(beta=0.1)(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), Totals(1, 1), ref)
    assert float(loss) == pytest.approx(0.1 * 0.306853, rel=1e-5)
    assert stats["kl"] == pytest.approx(0.306853, rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        Clipped(beta=0.1)(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), Totals(1, 1))


# A fixed 2×3 batch: the second completion's last token is padding (its ratio e^0.7 must not count). Ratios
# exp(logp − old): e^0.2 = 1.2214028, 1, e^-0.5 = 0.6065307 | 1, e^-0.2 = 0.8187308.
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
OLD = [[-1.2, -0.5, -1.5], [-0.3, -1.0, -1.4]]
REF = [[-0.9, -0.8, -1.8], [-0.5, -1.1, -0.2]]
ADV = [1.5, -0.5]
MASK_2x3 = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def on_batch(loss_fn, logp=None):
    """``loss_fn`` on the fixed batch (its logp, or ``logp`` given to read the gradient from)."""
    logp = torch.tensor(LOGP) if logp is None else logp
    old, adv, mask, ref = map(torch.tensor, (OLD, ADV, MASK_2x3, REF))
    return loss_fn(logp, old, adv, mask, Totals(5, 2), ref)


def from_recipe(**keys):
    """The loss a recipe's ``loss:`` section builds (no constant_normaliser: 4, as max_new_tokens would)."""
    return build_policy_loss(LossConfig(**keys), 4.0)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        # −(1.2214·1.5 + 1.5 + 0.6065·1.5 − 0.5 − 0.8187·0.5) / 5: no ratio reaches a bound it is clipped at
        ({"eps_low": 0.2, "eps_high": 0.28}, -0.6665069500540428),
        (
            {"eps_low": 0.2, "eps_high": 0.2, "kl_beta": 0.04, "aggregation": "seq-mean-token-mean"},
            -0.4736030247690907,
        ),
        (
            {"eps_low": 0.1, "eps_high": 0.2, "kl_beta": 0.1, "kl_estimator": "k1", "aggregation": "constant"},
            -0.40622449869611876,
        ),
        ({"eps_low": 0.2, "eps_high": 0.28, "kl_beta": 0.5, "kl_estimator": "k2"}, -0.6570069500540429),
    ],
)
def test_todays_clipped_loss_values_are_pinned(keys, expected):
    """Values the loss gave before losses were named (same config keys, default name: clipped)."""
    loss, _ = on_batch(from_recipe(**keys))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_todays_clipped_gradient_is_pinned():
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, _ = on_batch(from_recipe(eps_low=0.2, eps_high=0.28), logp)
    loss.backward()
    # −ρA/5 everywhere: each minimum is the unclipped term (0.6065 < 0.8 with A > 0 keeps ρA)
    expected = [[-1.2214028 * 1.5 / 5, -1.5 / 5, -0.6065307 * 1.5 / 5], [0.5 / 5, 0.8187308 * 0.5 / 5, 0.0]]
    assert torch.allclose(logp.grad, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_per_token_advantages_match_one_per_completion():
    per_completion, _ = on_batch(Clipped(eps_low=0.2, eps_high=0.28))
    adv = torch.tensor([[1.5] * 3, [-0.5] * 3])
    per_token, _ = Clipped(eps_low=0.2, eps_high=0.28)(
        torch.tensor(LOGP), torch.tensor(OLD), adv, torch.tensor(MASK_2x3), Totals(5, 2)
    )
    assert float(per_token) == float(per_completion)
    with pytest.raises(ValueError, match="shape"):
        Clipped()(torch.tensor(LOGP), torch.tensor(OLD), adv[:, :2], torch.tensor(MASK_2x3), Totals(5, 2))


def test_dual_clip_caps_the_loss_of_negative_advantages():
    # ratios 4, 1, 0.5 with A = −1 and 2, 1.5, 0.7 with A = 2; ε = 0.2/0.28, c = 3
    logp = torch.log(torch.tensor([[4.0, 1.0, 0.5], [2.0, 1.5, 0.7]])).requires_grad_()
    args = (torch.zeros(2, 3), torch.tensor([-1.0, 2.0]), torch.ones(2, 3), Totals(6, 2))
    dual, stats = DualClip(eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0)(logp, *args)
    # clipped per token: 4, 1, 0.8 | −2.56, −2.56, −1.4; the dual clip lowers the first from 4·1 to 3·1
    assert dual.item() == pytest.approx((3 + 1 + 0.8 - 2.56 - 2.56 - 1.4) / 6, rel=1e-6)
    clipped, _ = Clipped(eps_low=0.2, eps_high=0.28)(logp, *args)
    assert clipped.item() == pytest.approx((4 + 1 + 0.8 - 2.56 - 2.56 - 1.4) / 6, rel=1e-6)
    assert stats["dual_clip_frac"] == pytest.approx(1 / 6)
    dual.backward()
    # the capped token and the clipped ones get nothing; ρ = 1 (A = −1) gets −ρA/6, ρ = 0.7 (A = 2) −1.4/6
    expected = torch.tensor([[0.0, 1 / 6, 0.0], [0.0, 0.0, -1.4 / 6]])
    assert torch.allclose(logp.grad, expected, atol=1e-7)


def test_gspo_clips_one_ratio_per_sequence():
    # sequence ratios over trained tokens: exp((0.2 + 0 − 0.5) / 3) = exp((0 − 0.2) / 2) = e^-0.1 = 0.9048374;
    # A = 1.5 keeps s·A (below the clipped 0.9997·A); A = −0.5 takes the clipped 0.9997·(−0.5)
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, stats = on_batch(GSPO(), logp)
    assert loss.item() == pytest.approx((-3 * 0.9048374 * 1.5 + 2 * 0.9997 * 0.5) / 5, rel=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx(0.9048374, rel=1e-6)
    loss.backward()
    # each token of the unclipped sequence gets −s·A/5 (not −s·A/(5·3): the gradient is s per token)
    expected = torch.tensor([[-0.9048374 * 1.5 / 5] * 3, [0.0] * 3])
    assert torch.allclose(logp.grad, expected, rtol=1e-6, atol=1e-7)
    paper, _ = on_batch(GSPO(aggregation="seq-mean-token-mean"))
    assert float(paper) == pytest.approx((-0.9048374 * 1.5 + 0.9997 * 0.5) / 2, rel=1e-6)


def test_cispo_gradient_reaches_clipped_tokens():
    # weights clip(ρ, 0.8, 1.1): 1.1, 1, 0.8 | 1, 0.8187308; loss −w·A·logp per token
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, stats = on_batch(CISPO(cispo_eps_low=0.2, cispo_eps_high=0.1), logp)
    expected = (1.1 * 1.5 * 1.0 + 1.5 * 0.5 + 0.8 * 1.5 * 2.0 - 0.5 * 0.3 - 0.8187308 * 0.5 * 1.2) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    loss.backward()
    # −w·A/5 on every trained token, the two clipped ones (ρ = 1.22 and 0.61) included
    grad = [[-1.1 * 1.5 / 5, -1.5 / 5, -0.8 * 1.5 / 5], [0.5 / 5, 0.8187308 * 0.5 / 5, 0.0]]
    assert torch.allclose(logp.grad, torch.tensor(grad), rtol=1e-6, atol=1e-7)
    clipped = torch.tensor(LOGP, requires_grad=True)
    on_batch(Clipped(eps_low=0.2, eps_high=0.1), clipped)[0].backward()
    assert float(clipped.grad[0, 0]) == 0.0  # the clipped surrogate drops that token


def test_cispo_on_policy_gradient_is_minus_advantage():
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, _ = CISPO()(logp, logp.detach(), torch.tensor(ADV), torch.tensor(MASK_2x3), Totals(5, 2))
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.3] * 3, [0.1, 0.1, 0.0]]))


def test_kl_in_reward_adjusts_each_tokens_advantage():
    # k1 of old vs ref: −0.3, 0.3, 0.3 | 0.2, 0.1, so with β = 0.5 A_t = 1.65, 1.35, 1.35 | −0.6, −0.55
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, stats = on_batch(from_recipe(kl_beta=0.5, kl_estimator="k1", kl_in_reward=True), logp)
    per_token = [1.2214028 * 1.65, 1.35, 0.6065307 * 1.35, -0.6, -0.8187308 * 0.55]
    assert loss.item() == pytest.approx(-sum(per_token) / 5, rel=1e-6)
    assert stats["kl"] == pytest.approx(0.6 / 5)
    loss.backward()
    # −ρ·A_t/5 and no KL gradient (as a loss term, k1 would add β/5 = 0.1 to every trained token)
    expected = [[-1.2214028 * 1.65 / 5, -1.35 / 5, -0.6065307 * 1.35 / 5], [0.6 / 5, 0.8187308 * 0.55 / 5, 0.0]]
    assert torch.allclose(logp.grad, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    in_loss = torch.tensor(LOGP, requires_grad=True)
    on_batch(from_recipe(kl_beta=0.5, kl_estimator="k1"), in_loss)[0].backward()
    pinned = [[-1.2214028 * 1.5 / 5, -1.5 / 5, -0.6065307 * 1.5 / 5], [0.5 / 5, 0.8187308 * 0.5 / 5, 0.0]]
    with_kl = torch.tensor(pinned) + 0.1 * torch.tensor(MASK_2x3)
    assert torch.allclose(in_loss.grad, with_kl, rtol=1e-6, atol=1e-7)


def test_recipe_keys_reach_the_named_loss():
    loss = from_recipe(name="dual_clip", eps_low=0.1, clip_ratio_c=2.5, kl_beta=0.2, constant_normaliser=8)
    assert loss == DualClip(eps_low=0.1, eps_high=0.28, clip_ratio_c=2.5, beta=0.2, constant=8.0)
    assert from_recipe(name="gspo") == GSPO(gspo_eps_low=3e-4, gspo_eps_high=4e-4, constant=4.0)
    for name in POLICY_LOSSES.names():
        assert set(own_keys(POLICY_LOSSES.get(name))) <= set(LossConfig.model_fields)


RECIPE_BASE = "data: {source: task:chain_sum, size: 10}\nrl: {steps: 1}\n"


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ("{name: gspoo}", "loss.name: unknown policy loss 'gspoo'; did you mean 'gspo'?"),
        (
            "{aggregation: token-maen}",
            "loss.aggregation: unknown loss aggregation 'token-maen'; did you mean 'token-mean'?",
        ),
        ("{kl_estimator: k4}", "loss.kl_estimator: unknown KL estimator 'k4'; known: k1, k2, k3"),
        ("{clip_ratio_c: 2.0}", "loss: clip_ratio_c is read by dual_clip, not by loss 'clipped'"),
        ("{name: dual_clip, clip_ratio_c: 1.0}", "loss.clip_ratio_c = 1.0: should be greater than 1"),
    ],
)
def test_bad_loss_settings_fail_at_load(tmp_path, loss, message):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE_BASE + f"loss: {loss}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: {message}"


def test_switching_loss_keeps_the_default_loss_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE_BASE + "loss: {eps_low: 0.1, eps_high: 0.2, kl_beta: 0.01}\n")
    assert load_recipe(path, ["loss.name=cispo"]).loss.name == "cispo"
    # as a run's resolved config.yaml lists them: other losses' keys at their defaults
    resolved = ["loss.name=gspo", "loss.clip_ratio_c=3.0", "loss.cispo_eps_high=3.0"]
    assert load_recipe(path, resolved).loss.name == "gspo"


TINY = """
model: {name: tiny-random}
data: {source: task:chain_sum, size: 8, task_args: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}
generation: {num_generations: 4, prompts_per_step: 2, max_new_tokens: 6}
rewards: [{name: test-odd-tokens}]
rl: {steps: 1, num_iterations: 2}
optim: {lr: 1.0e-3}
"""


@REWARDS.register("test-odd-tokens")
class OddTokens(Reward):
    """Share of completion tokens with an odd id: varies within groups, so every step has advantages."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        return RewardResult([sum(t % 2 for t in c.completion_ids) / max(1, c.length) for c in batch])


@pytest.mark.parametrize(
    "loss",
    [*(f"{{name: {name}}}" for name in POLICY_LOSSES.names()), "{kl_beta: 0.05, kl_in_reward: true}"],
)
def test_each_loss_trains_the_tiny_model(tmp_path, loss):
    path = tmp_path / "r.yaml"
    path.write_text(TINY + f"loss: {loss}\n")
    run = Run(load_recipe(path), tmp_path / "run")
    run.execute()
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    record = next(r for r in map(json.loads, lines) if r.get("stage") == "rl")
    assert record["train/skipped"] == 0.0 and record["train/grad_norm"] > 0
    assert math.isfinite(record["train/loss"])
    assert record["train/ratio_mean"] != 1.0  # the second pass sees the first one's update
    assert ("train/kl" in record) == ("kl_beta" in loss)
