"""Intervals and paired tests of incentive.stats against numbers worked out by hand (z = 1.959964)."""

import pytest

from incentive.stats import (
    AGRESTI_MIN,
    CLUSTERED,
    MCNEMAR,
    PAIRED_NORMAL,
    SIGN,
    WILSON,
    agresti_min,
    paired_compare,
    rate_interval,
    sign_test,
    wilson,
    z_value,
)


def test_z_value():
    assert z_value() == pytest.approx(1.959964, abs=1e-6)


def test_wilson_39_of_100():
    # z² = 3.841459; denom = 1 + z²/100 = 1.0384146; centre = (0.39 + z²/200) / denom = 0.394069;
    # half = z·sqrt(0.39·0.61/100 + z²/40000) / denom = z·0.0497498 / denom = 0.093900
    assert wilson(39, 100) == pytest.approx((0.300169, 0.487970), abs=1e-6)


def test_wilson_at_zero_has_width():
    # p = 0: centre = half = (z²/20) / (1 + z²/10) = 0.192073 / 1.384146 = 0.138766
    assert wilson(0, 10) == pytest.approx((0.0, 0.277532), abs=1e-6)


def test_one_sample_per_prompt_is_wilson():
    interval = rate_interval([(1, 1)] * 39 + [(0, 1)] * 61)
    assert interval.method == WILSON and interval.n_eff == 100
    assert (interval.rate, interval.low, interval.high) == pytest.approx((0.39, 0.300169, 0.487970), abs=1e-6)


def test_several_samples_per_prompt_use_the_cluster_robust_effective_size():
    # 4 prompts × 2 samples, 3 of 8 right: p = 0.375; residuals k − p·m = 1.25, 0.25, −0.75, −0.75 (squares 2.75);
    # CR1 variance = 4/3 · 2.75 / 64 = 0.0572917; binomial p(1 − p)/8 = 0.0292969; deff = 1.955556;
    # n_eff = 8 / deff = 4.090909; Wilson at p = 0.375, n = 4.090909: centre 0.435534, half 0.342295.
    interval = rate_interval([(2, 2), (1, 2), (0, 2), (0, 2)])
    assert interval.method == CLUSTERED
    assert interval.n_eff == pytest.approx(4.090909, abs=1e-6)
    assert (interval.low, interval.high) == pytest.approx((0.093238, 0.777831), abs=1e-6)


def test_clustered_rate_without_variation_counts_each_prompt_once():
    interval = rate_interval([(0, 4)] * 10)
    assert interval.n_eff == 10 and (interval.low, interval.high) == pytest.approx(wilson(0, 10))


def test_sign_test_is_mcnemar_exact():
    # 9 discordant pairs, 2 one way and 7 the other: 2 · (C(9,0) + C(9,1) + C(9,2)) / 2⁹ = 2 · 46/512
    assert sign_test(7, 2) == pytest.approx(92 / 512)
    assert sign_test(2, 7) == sign_test(7, 2)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)


def test_agresti_min_interval():
    # n = 20, 2 right only under A, 7 only under B; cells + 1/2: size 22, diff = 5/22 = 0.227273;
    # se = sqrt(10 − 25/22) / 22 = 0.135327; ± z·se = 0.265237
    assert agresti_min(2, 7, 20) == pytest.approx((-0.037963, 0.492508), abs=1e-6)


def test_paired_compare_one_sample_per_prompt():
    # 20 prompts: 8 right under both, 3 wrong under both, 2 right only under A, 7 right only under B
    a = [(1, 1)] * 8 + [(0, 1)] * 3 + [(1, 1)] * 2 + [(0, 1)] * 7
    b = [(1, 1)] * 8 + [(0, 1)] * 3 + [(0, 1)] * 2 + [(1, 1)] * 7
    result = paired_compare(a, b)
    assert (result.rate_a, result.rate_b, result.diff) == pytest.approx((0.5, 0.75, 0.25))
    assert (result.b_better, result.a_better) == (7, 2)
    assert (result.interval, result.test) == (AGRESTI_MIN, MCNEMAR)
    assert (result.low, result.high) == pytest.approx(agresti_min(2, 7, 20))
    assert result.p_value == pytest.approx(92 / 512) and not result.significant


def test_paired_compare_several_samples_per_prompt():
    # per-prompt differences 0.5, 0.5, 0, 0.5: mean 0.375, sd 0.25, se 0.125, ± z·se = 0.244996;
    # sign test: 3 prompts better under B, none under A → 2/8
    result = paired_compare([(1, 2), (0, 2), (2, 2), (1, 2)], [(2, 2), (1, 2), (2, 2), (2, 2)])
    assert (result.interval, result.test) == (PAIRED_NORMAL, SIGN)
    assert result.diff == pytest.approx(0.375)
    assert (result.low, result.high) == pytest.approx((0.130004, 0.619996), abs=1e-6)
    assert result.p_value == pytest.approx(0.25)


def test_a_significant_difference():
    result = paired_compare([(0, 1)] * 12, [(1, 1)] * 12)
    assert result.p_value == pytest.approx(2 / 4096) and result.significant


def test_paired_compare_needs_matching_sides():
    with pytest.raises(ValueError):
        paired_compare([(1, 1)], [(1, 1), (0, 1)])
