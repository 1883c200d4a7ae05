import math

import pytest
import torch

from incentive.losses import AGGREGATIONS, KL_ESTIMATORS, PolicyLoss, Totals

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
    loss_fn = PolicyLoss(eps_low=0.2, eps_high=0.28)
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio))
    loss, _ = loss_fn(logp, old, torch.tensor([advantage]), torch.ones(1, 1), Totals(1, 1))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_clip_fraction_counts_clipped_tokens():
    loss_fn = PolicyLoss(eps_low=0.2, eps_high=0.2)
    logp = torch.log(torch.tensor([[1.5, 1.0]]))
    _, stats = loss_fn(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), Totals(2, 1))
    assert stats["clip_frac"] == pytest.approx(0.5)


def test_on_policy_gradient_is_minus_advantage_over_tokens():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, _ = PolicyLoss()(logp, logp.detach(), adv, mask, Totals(3, 2))
    loss.backward()
    expected = torch.tensor([[-2.0, -2.0], [1.0, 0.0]]) / 3
    assert torch.allclose(logp.grad, expected)


def test_kl_penalty_added_and_needs_reference():
    logp = torch.zeros(1, 1)
    ref = torch.full((1, 1), math.log(2))
    loss, stats = PolicyLoss(beta=0.1)(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), Totals(1, 1), ref)
    assert float(loss) == pytest.approx(0.1 * 0.306853, rel=1e-5)
    assert stats["kl"] == pytest.approx(0.306853, rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        PolicyLoss(beta=0.1)(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), Totals(1, 1))
