import pytest

from incentive.data import Example
from incentive.rewards.base import RewardContext
from incentive.rewards.verifier import RuleVerifier, extract_answer
from incentive.rollout.types import Completion, RolloutBatch
from incentive.templates import TagFormat


def batch(texts, reference="7", metadata=None):
    ex = Example(prompt="3 + 4 =", reference=reference, metadata=metadata or {})
    return RolloutBatch([Completion(0, ex, "", [1], [1], t) for t in texts])


def score(texts, **kw):
    result = RuleVerifier()(batch(texts, **kw), RewardContext(tokenizer=None, tags=TagFormat()))
    return result.scores, result.reasons


def test_math_answers():
    scores, reasons = score(
        [
            "<think>3+4=7</think><answer>7</answer>",
            "<answer>7.0</answer>",
            "<answer>8</answer>",
            "no tags",
            r"so \boxed{7}",
        ]
    )
    assert scores == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert reasons[3] == "no answer found"


def test_fractions_and_latex():
    scores, _ = score(
        ["<answer>0.5</answer>", r"<answer>\frac{1}{2}</answer>", "<answer>1/3</answer>"], reference="1/2"
    )
    assert scores == [1.0, 1.0, 0.0]


def test_reasoning_gym_scorer_is_used_for_its_tasks():
    from incentive.data import DataConfig, load_examples

    ex = load_examples(DataConfig(source="task:chain_sum", size=1)).examples[0]
    texts = [f"<answer>{ex.reference}</answer>", "<answer>nonsense</answer>"]
    result = RuleVerifier()(
        RolloutBatch([Completion(0, ex, "", [1], [1], t) for t in texts]), RewardContext(None, TagFormat())
    )
    assert result.scores == [1.0, 0.0]


def test_garbage_is_a_scored_zero_not_a_crash():
    scores, _ = score(
        ["<answer>\\frac{{{</answer>", "<answer>" + "9" * 5000 + "</answer>", "<answer></answer>"]
    )
    assert scores == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("text", "tagged", "expected"),
    [("x \\boxed{12} y \\boxed{13}", None, "13"), ("t", "5", "5"), ("none", None, None)],
)
def test_extract_answer(text, tagged, expected):
    assert extract_answer(text, tagged) == expected
