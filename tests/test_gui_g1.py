"""GUI-G1 against the worked numbers of methods/gui-g1.md §8: box rewards, constant normaliser, difficulty weights,
the fast-thinking template."""

import pytest
import torch

from incentive.advantages import ADVANTAGES
from incentive.config import RewardConfig, TemplateConfig
from incentive.data import Example
from incentive.losses import Clipped, Totals
from incentive.rewards.base import RewardContext
from incentive.rewards.gui_g1 import closeness, hit, iou, parse_box
from incentive.rewards.pipeline import RewardPipeline
from incentive.rollout.types import Completion, RolloutBatch
from incentive.run import build_template
from incentive.templates import DirectFormat

GT = (100.0, 100.0, 200.0, 150.0)
PIPELINE = RewardPipeline(
    [
        RewardConfig(name="box_hit", weight=1.0),
        RewardConfig(name="box_iou", weight=0.25),
        RewardConfig(name="box_closeness", weight=0.125),
    ]
)


def totals(texts):
    ex = Example("click Save", "[100, 100, 200, 150]", metadata={"width": 1000, "height": 800})
    batch = RolloutBatch([Completion(0, ex, "", [1], [1], t) for t in texts])
    return PIPELINE(batch, RewardContext(None, DirectFormat()))


def test_worked_example():
    pred = (110.0, 95.0, 190.0, 160.0)
    assert hit(pred, GT) == 1.0
    assert iou(pred, GT) == pytest.approx(4000 / 6200)
    assert closeness(pred, GT, 1000, 800) == pytest.approx(0.99031, abs=1e-5)
    scored = totals(['[{"bbox_2d": [110, 95, 190, 160]}]'])
    assert scored.components["box_iou"][0] == pytest.approx(0.6452, abs=1e-4)
    assert scored.total[0] == pytest.approx(1.2851, abs=1e-4)


def test_identical_disjoint_and_unparsable():
    scored = totals(["```json\n[100, 100, 200, 150]\n```", "[900, 700, 950, 780]", "I think it's the button"])
    assert scored.total[0] == pytest.approx(1.375)
    assert scored.components["box_hit"][1] == 0.0 and scored.components["box_iou"][1] == 0.0
    assert 0 < scored.components["box_closeness"][1] < 1
    assert scored.total[2] == 0.0
    assert scored.reasons[2] and "no box" in scored.reasons[2][0]


def test_closeness_is_clamped():
    assert closeness((1100.0, 100.0, 1200.0, 150.0), GT, 1000, 800) == 0.0  # an edge a full width off


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]', (1, 2, 3, 4)),
        ("{'bbox_2d': [1, 2, 3, 4]}", (1, 2, 3, 4)),
        ("The box is [1, 2.5, 3, 4].", (1, 2.5, 3, 4)),
        ("[1, 2, 3]", None),
        ("[true, 2, 3, 4]", None),
        ("nothing", None),
    ],
)
def test_parse_box(text, box):
    assert parse_box(text) == box


def test_group_advantage_without_std():
    out = ADVANTAGES.get("dr_grpo")()(torch.tensor([1.375, 0, 1.0, 0.5]), [0] * 4)
    assert out.tolist() == pytest.approx([0.65625, -0.71875, 0.28125, -0.21875])


def test_difficulty_weight_scales_the_advantage():
    weighted = ADVANTAGES.get("difficulty_weighted")()
    examples = [Example("q", "a", difficulty=w) for w in (1.0, 2.0, 0.0, None)]
    out = weighted(torch.tensor([1.375, 0, 1.0, 0.5]), [0] * 4, examples).tolist()
    assert out == pytest.approx([0.65625, -1.4375, 0.0, -0.21875])


def test_constant_normaliser_weighs_long_responses_by_their_length():
    loss = Clipped(aggregation="constant", constant=64.0)
    logp = torch.zeros(2, 40, requires_grad=True)
    mask = torch.zeros(2, 40)
    mask[0, :10] = 1
    mask[1, :40] = 1
    value, _ = loss(logp, logp.detach(), torch.tensor([1.0, 1.0]), mask, Totals(tokens=50, sequences=2))
    value.backward()
    grads = logp.grad.abs().sum(-1)
    assert float(grads[1] / grads[0]) == pytest.approx(4.0)


def test_fast_thinking_template():
    template = build_template(TemplateConfig(name="fast-thinking", chat_template=False))
    prompt = template.render(Example("Click Save.", "[1, 2, 3, 4]"), tokenizer=None)
    assert "<think>" not in prompt and "final answer only" in prompt
    parsed = template.tags.parse(' [{"bbox_2d": [1, 2, 3, 4]}] ')
    assert parsed.strict and parsed.answer == '[{"bbox_2d": [1, 2, 3, 4]}]' and parsed.reasoning is None
    assert not template.tags.parse("<think>hm</think>[1, 2, 3, 4]").strict
    assert template.tags.render("ignored", "[1, 2, 3, 4]") == "[1, 2, 3, 4]"
