"""Prior prompt engineering against methods/prior-prompt-engineering.md §7: tag-aware format and accuracy rewards
for all five prior prompts."""

import pytest

from incentive.config import RewardConfig, TemplateConfig
from incentive.data import Example
from incentive.rewards.base import RewardContext
from incentive.rewards.pipeline import RewardPipeline
from incentive.rollout.types import Completion, RolloutBatch
from incentive.run import build_template
from incentive.templates import PriorFormat

PPE = RewardPipeline(
    [RewardConfig(name="tag_format", weight=0.5), RewardConfig(name="answer_verifier", weight=0.5)]
)


def scored(texts, reference="3", tags=None):
    ex = Example("1 + 2 =", reference)
    batch = RolloutBatch([Completion(0, ex, "", [1], [1], t) for t in texts])
    return PPE(batch, RewardContext(None, tags or PriorFormat("plan")))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"<plan>a</plan><answer>\boxed{3}</answer>", 0.5),
        (r"<plan>a</plan><plan>b</plan><answer>\boxed{3}</answer>", 0.0),
        (r"<plan>a<plan>b</plan><answer>\boxed{3}</answer>", 0.0),
        (r"<answer>\boxed{3}</answer><plan>a</plan>", 0.0),
        (r"<plan>a</plan><answer>\boxed{3}", 0.0),
        (r"<think>a</think><answer>\boxed{3}</answer>", 0.0),
    ],
)
def test_format_reward_counts_tags(text, expected):
    assert scored([text]).components["tag_format"] == [expected * 2]
    assert scored([text]).total[0] - 0.5 * scored([text]).components["answer_verifier"][0] == expected


def test_accuracy_reads_only_the_answer_block():
    result = scored(
        [
            r"<plan>a</plan><answer>\boxed{1/2}</answer>",
            r"<plan>\boxed{0.5}</plan><answer>none</answer>",
            r"\boxed{0.5}",
            "<plan>a</plan><answer>0.5</answer>",
        ],
        reference="0.5",
    )
    assert result.components["answer_verifier"] == [1.0, 0.0, 0.0, 0.0]


def test_totals():
    result = scored(
        [
            r"<plan>a</plan><answer>\boxed{3}</answer>",
            r"<plan>a</plan><answer>\boxed{4}</answer>",
            r"<answer>\boxed{3}</answer>",
            r"<plan>a</plan> \boxed{3}",
        ]
    )
    # accuracy does not depend on the format: a correct answer without the <plan> block still earns 0.5
    assert result.total == [1.0, 0.5, 0.5, 0.0]


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("ppe-reasoning", "think"),
        ("ppe-planning", "plan"),
        ("ppe-code", "code"),
        ("ppe-knowledge", "knowledge"),
        ("ppe-null-example", "examples"),
    ],
)
def test_each_prior_round_trips(name, tag):
    template = build_template(TemplateConfig(name=name, chat_template=False))
    assert template.tags.think == tag
    prompt = template.render(Example("What is 1 + 2?", "3"), tokenizer=None)
    for text in (f"<{tag}>", f"</{tag}>", "<answer>", "</answer>", r"\boxed{}", "What is 1 + 2?"):
        assert text in prompt
    response = template.tags.render("1 + 2 = 3", "3")
    assert scored([response], tags=template.tags).total == [1.0]


def test_a_recipe_can_rename_the_tag():
    template = build_template(TemplateConfig(name="ppe-planning", think_tag="steps", chat_template=False))
    assert "<steps>" in template.render(Example("q", "1"), tokenizer=None)
    assert build_template(TemplateConfig(name="think-answer")).tags.think == "think"
