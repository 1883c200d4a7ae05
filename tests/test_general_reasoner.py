"""General-Reasoner verifier reward (spec: methods/general-reasoner.md §8) with a fake judge and a character
tokenizer (one token per character, so token differences are easy to count by hand)."""

import pytest

from incentive.data import Example
from incentive.rewards.base import RewardContext
from incentive.rewards.general_reasoner import (
    GeneralReasoner,
    extract_final_answer,
    gr_prompt,
    gr_score,
)
from incentive.rollout.types import Completion, RolloutBatch
from incentive.templates import TagFormat


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()


def ctx():
    """A fresh context per batch, as in training (its parse cache is keyed by the batch's id)."""
    return RewardContext(tokenizer=TOK, tags=TagFormat())


class FakeJudge:
    def __init__(self, decision="Yes"):
        self.decision = decision
        self.prompts = []

    def complete(self, prompts, *, chat, max_new_tokens, temperature):
        assert chat is False  # the General-Verifier prompt is raw text
        self.prompts += prompts
        return [f"The answers match. Final Decision: {self.decision}" for _ in prompts]


def completion(text, reference="5", prompt="What is 2 + 3?"):
    ex = Example(prompt=prompt, reference=reference)
    return Completion(0, ex, prompt, TOK.encode(prompt), TOK.encode(text), text)


def score(texts, decision="Yes", reference="5", **kw):
    judge = FakeJudge(decision)
    reward = GeneralReasoner(judge=judge, **kw)
    result = reward(RolloutBatch([completion(t, reference) for t in texts]), ctx())
    return result, judge


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{a}{b}} done", r"\frac{a}{b}"),
        (r"\boxed{1} and \boxed{2}", "2"),
        (r"\boxed{\sqrt{\frac{1}{2}}}", r"\sqrt{\frac{1}{2}}"),
        ("reasoning\nFinal Answer: 42\nthanks", "42"),
        ("The answer is: 7<|im_end|>", "7"),
        (r"Put it in \boxed{}. Answer: 3", "3"),  # an empty box falls through to the markers
        ("nothing to see", None),
    ],
)
def test_extraction(text, expected):
    assert extract_final_answer(text) == expected


def test_reward_table():
    assert gr_score("5", "5", True, TOK) == (1.0, 0)
    assert gr_score("5.0", "5", True, TOK) == (pytest.approx(0.9), 2)
    assert gr_score("5" * 30, "5", True, TOK)[0] == pytest.approx(0.5)
    assert gr_score("6", "5", False, TOK) == (0.0, 0)
    assert gr_score(None, "5", False, TOK)[0] == -0.5
    # kept quirk: no answer but the judge says yes → 0.5 − 0.05·min(|len("No Answer") − len("5")|, 10)
    assert gr_score(None, "5", True, TOK)[0] == pytest.approx(0.5 - 0.05 * 8)


def test_reward_over_a_batch_with_tagged_and_boxed_answers():
    result, judge = score(["<answer>5</answer>", r"it is \boxed{5.0}", "no idea"], decision="Yes")
    assert result.scores == pytest.approx([1.0, 0.9, 0.5 - 0.05 * 8])
    assert result.extras["no_answer"] == [0.0, 0.0, 1.0]
    assert result.reasons[2] == "no final answer found"
    assert "### Student Answer: None\n" in judge.prompts[2]  # the paper's judge literally sees None
    result, _ = score(["<answer>6</answer>", "no idea"], decision="No")
    assert result.scores == [0.0, -0.5]
    assert result.extras["correct"] == [0.0, 0.0]


def test_answer_tags_can_be_ignored_for_the_papers_extraction():
    result, _ = score(["<answer>5</answer>"], use_answer_tags=False)
    assert result.extras["no_answer"] == [1.0]


def test_prompt_shape():
    prompt = gr_prompt("Q?", "G", "S")
    assert prompt.startswith("User: ### Question: Q?")
    assert prompt.endswith("Assistant:")
    heads = [
        prompt.index(h) for h in ("### Question:", "### Ground Truth Answer: G", "### Student Answer: S")
    ]
    assert heads == sorted(heads)


@pytest.mark.parametrize(
    ("output", "passes"),
    [("...reasoning... Final Decision: Yes", True), ("Final Decision: No", False), ("they match", False)],
)
def test_decision_parsing(output, passes):
    class Fixed:
        def complete(self, prompts, **kw):
            return [output for _ in prompts]

    result = GeneralReasoner(judge=Fixed())(RolloutBatch([completion("<answer>5</answer>")]), ctx())
    assert result.extras["decision"] == [float(passes)]


def test_only_the_last_tail_tokens_are_searched():
    early_box = r"\boxed{5}" + " " * 1100
    c = completion("filler", prompt=early_box)
    reward = GeneralReasoner(judge=FakeJudge())
    assert reward.extract(c, None, TOK) is None
    assert GeneralReasoner(judge=FakeJudge(), tail_tokens=2000).extract(c, None, TOK) == "5"


def test_judge_failure_is_a_reasoned_score():
    class Broken:
        def complete(self, prompts, **kw):
            raise RuntimeError("boom")

    result = GeneralReasoner(judge=Broken())(RolloutBatch([completion("<answer>5</answer>")]), ctx())
    assert result.scores == [0.0]
    assert result.reasons[0].startswith("judge failed")
