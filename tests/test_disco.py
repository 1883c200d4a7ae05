"""DISCO against the worked numbers of methods/disco.md §7, and its refusal of std-normalised advantages."""

import math

import pytest
import torch

from incentive.advantages import ADVANTAGES, DISCO, DOMAIN_WEIGHTS
from incentive.config import ConfigError, load_recipe
from incentive.data import Example
from incentive.run import Run

MAJOR, MINOR = Example("q", "1", domain="math"), Example("q", "1", domain="nq")
SHARES = {"math": 0.75, "nq": 1 / 12, "arc": 1 / 12, "imdb": 1 / 12}


def advantages(estimator, scores, groups, examples):
    return estimator(torch.tensor(scores, dtype=torch.float64), groups, examples).tolist()


@pytest.mark.parametrize(
    ("kind", "major", "minor"), [("log", 0.8473, 2.5649), ("log_sq", 0.7179, 6.5790), ("inv", 1.3333, 12.0)]
)
def test_domain_weights(kind, major, minor):
    assert DOMAIN_WEIGHTS[kind](0.75) == pytest.approx(major, abs=1e-4)
    assert DOMAIN_WEIGHTS[kind](1 / 12) == pytest.approx(minor, abs=1e-4)


def test_minority_group_worked_example():
    disco = DISCO(domain_shares=SHARES)
    out = advantages(disco, [1, 0, 0, 1], [0] * 4, [MINOR] * 4)
    assert out == pytest.approx([2.5649, -2.5649, -2.5649, 2.5649], abs=1e-3)


def test_closed_form_and_uniform_groups():
    disco = DISCO(domain_weight="none", domain_shares=SHARES)
    out = advantages(disco, [1] + [0] * 7, [0] * 8, [MAJOR] * 8)
    assert out[0] == pytest.approx(7.0, abs=1e-3)
    assert out[1:] == pytest.approx([-1.0] * 7, abs=1e-3)
    assert advantages(disco, [1] * 8, [0] * 8, [MAJOR] * 8) == [0.0] * 8
    assert advantages(disco, [0] * 8, [0] * 8, [MAJOR] * 8) == [0.0] * 8


def test_std_normalisation_would_cancel_the_weights_so_disco_refuses_it():
    grpo = ADVANTAGES.get("grpo")()
    plain = advantages(grpo, [1, 0, 0, 1], [0] * 4, None)
    assert advantages(grpo, [5.1298, 0, 0, 5.1298], [0] * 4, None) == pytest.approx(
        plain, rel=1e-3
    )  # up to ε
    with pytest.raises(ConfigError, match="std normalisation"):
        DISCO(base="grpo")


def test_recipe_with_disco_on_grpo_fails_before_anything_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "data: {source: task:chain_sum, size: 4}\nrl: {steps: 1}\n"
        "advantage: {name: disco, args: {base: grpo}}\n"
    )
    with pytest.raises(ConfigError, match="advantage 'disco'.*dr_grpo"):
        Run(load_recipe(path), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_batching_matches_separate_calls():
    disco = DISCO(domain_shares=SHARES)
    together = advantages(disco, [1, 1, 0, 0, 0, 1, 0, 0], [3, 8, 3, 8, 3, 8, 3, 8], [MINOR, MAJOR] * 4)
    alone_minor = advantages(disco, [1, 0, 0, 0], [0] * 4, [MINOR] * 4)
    alone_major = advantages(disco, [1, 0, 1, 0], [0] * 4, [MAJOR] * 4)
    assert together[0::2] == pytest.approx(alone_minor)
    assert together[1::2] == pytest.approx(alone_major)


def test_shares_are_counted_from_the_training_data():
    disco = DISCO()
    disco.fit([MAJOR] * 9 + [MINOR] * 3)
    assert disco.shares == {"math": 0.75, "nq": 0.25}
    assert disco.domain_weight("nq") == pytest.approx(math.log(5))
    with pytest.raises(ValueError, match="no training share"):
        disco.domain_weight("imdb")


W_D = math.log(1 + 1 / 0.75)  # domain "d" at share 0.75


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        # shifted by the lowest reward: [1.5, 0, 0, 0], SC = 0.375 → the 0/1 closed form w·(G/k − 1), −w
        ([1, -0.5, -0.5, -0.5], [3 * W_D, -W_D, -W_D, -W_D]),
        ([1, 1, 1, -0.5], [W_D / 3, W_D / 3, W_D / 3, -W_D]),  # [1.5, 1.5, 1.5, 0], SC = 1.125
        ([-0.5, -1.0], [W_D, -W_D]),  # [0.5, 0], SC = 0.25
        # [1.5, 0, 1.25, 0.75], SC = 0.875: A = w·(u − 0.875) / 0.875
        ([0.5, -1.0, 0.25, -0.25], [W_D * 5 / 7, -W_D, W_D * 3 / 7, -W_D / 7]),
        ([-0.5, -0.5, -0.5], [0.0, 0.0, 0.0]),
    ],
)
def test_negative_and_mixed_sign_groups_by_hand(scores, expected):
    disco = DISCO(domain_weight="log", domain_shares={"d": 0.75})
    out = advantages(disco, scores, [0] * len(scores), [Example("q", "1", domain="d")] * len(scores))
    assert out == pytest.approx(expected, abs=1e-4)
    assert max(map(abs, out)) <= W_D * (len(scores) - 1) + 1e-6


def test_advantages_stay_within_the_binary_bound_for_any_rewards():
    disco = DISCO(domain_weight="none", domain_shares=SHARES)
    scores = torch.rand(200, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4 - 3
    out = disco(scores.flatten(), [i // 4 for i in range(800)], [MAJOR] * 800)
    assert out.abs().max() <= 3 + 1e-5  # w_dom·(G − 1) with w_dom = 1, G = 4
    assert out.min() >= -1 - 1e-5  # a below-mean reward loses at most w_dom, as with 0/1 rewards
