import math

import pytest
import torch

from incentive.advantages import ADVANTAGES


def adv(name, scores, groups, **kw):
    return ADVANTAGES.get(name)(**kw)(torch.tensor(scores, dtype=torch.float64), groups).tolist()


def test_grpo_hand_computed():
    std = math.sqrt(1 / 3)  # Bessel-corrected std of [1, 0, 0, 1]
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)]
    assert adv("grpo", [1, 0, 0, 1], [0, 0, 0, 0]) == pytest.approx(expected, rel=1e-6)
    assert adv("grpo", [1, 0, 0, 1], [0] * 4)[0] == pytest.approx(0.865877, rel=1e-5)


def test_dr_grpo_matches_nover_spec_example():
    assert adv("dr_grpo", [3, 1, 0, 2], [5] * 4) == pytest.approx([1.5, -0.5, -1.5, 0.5])


def test_rloo_is_leave_one_out():
    assert adv("rloo", [3, 1, 0, 2], [1] * 4) == pytest.approx([2.0, -2 / 3, -2.0, 2 / 3])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_groups_out_of_order_match_groups_alone(name):
    a, b = [3.0, 1.0, 0.0, 2.0], [0.5, 0.5, 1.0, 0.0]
    interleaved_scores = [a[0], b[0], b[1], a[1], a[2], b[2], a[3], b[3]]
    interleaved_groups = [9, 2, 2, 9, 9, 2, 9, 2]
    out = adv(name, interleaved_scores, interleaved_groups)
    alone_a, alone_b = adv(name, a, [0] * 4), adv(name, b, [0] * 4)
    assert [out[0], out[3], out[4], out[6]] == pytest.approx(alone_a)
    assert [out[1], out[2], out[5], out[7]] == pytest.approx(alone_b)


def test_uniform_group_and_lone_sample_get_zero():
    assert adv("grpo", [1, 1, 1], [0, 0, 0]) == [0, 0, 0]
    assert adv("grpo", [5.0], [0]) == [0]
    assert adv("rloo", [5.0], [0]) == [0]


def test_failed_samples_excluded_and_zeroed():
    out = adv("dr_grpo", [3, float("nan"), 1, 2], [0] * 4)
    assert out == pytest.approx([1.0, 0.0, -1.0, 0.0])
    assert adv("grpo", [float("nan")] * 2, [0, 0]) == [0, 0]
