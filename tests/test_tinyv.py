"""TinyV fallback (spec: methods/tinyv.md §9) with a fake judge; one test runs a real (tiny random) judge model."""

import random

import pytest

from incentive.data import Example
from incentive.models import ModelLoadError
from incentive.rewards.base import RewardContext
from incentive.rewards.tinyv import TinyV, parse_tinyv, tinyv_prompt
from incentive.rollout.types import Completion, RolloutBatch
from incentive.templates import TagFormat


def ctx():
    """A fresh context per batch, as in training (its parse cache is keyed by the batch's id)."""
    return RewardContext(tokenizer=None, tags=TagFormat())


class FakeJudge:
    """Answers every prompt with ``reply(prompt)``; records each call's prompts and temperature."""

    def __init__(self, reply="True", fail=False):
        self.reply = reply if callable(reply) else (lambda prompt: reply)
        self.fail = fail
        self.calls = []

    def complete(self, prompts, *, chat, max_new_tokens, temperature):
        self.calls.append((list(prompts), temperature))
        if self.fail:
            raise RuntimeError("server down")
        return [self.reply(p) for p in prompts]

    @property
    def prompts(self):
        return [p for batch, _ in self.calls for p in batch]


def batch(answers, reference="7", question="3 + 4 ="):
    ex = Example(prompt=question, reference=reference)
    return RolloutBatch([Completion(0, ex, "", [1], [1], f"<answer>{a}</answer>") for a in answers])


def run(answers, judge, **kw):
    return TinyV(judge=judge, **kw)(batch(answers), ctx())


def test_addon_truth_table():
    judge = FakeJudge("True")
    assert run(["7", "7.0"], judge).scores == [1.0, 1.0]
    assert judge.calls == []  # rule positives never reach the judge
    assert run(["7", "8"], FakeJudge("True")).scores == [1.0, 1.0]
    assert run(["7", "8"], FakeJudge("False")).scores == [1.0, 0.0]
    assert run(["8"], FakeJudge("True"), weight=0.5).scores == [0.5]


def test_other_modes():
    assert run(["7"], FakeJudge("False"), mode="mixed", weight=0.25).scores == [0.75]
    assert run(["7", "8"], FakeJudge("False"), mode="tinyv_only").scores == [0.0, 0.0]
    with pytest.raises(ValueError, match="mode"):
        TinyV(mode="sometimes")


@pytest.mark.parametrize(
    ("output", "think", "expected"),
    [
        ("True", False, True),
        (" false.", False, False),
        ("TRUE", False, True),
        ("I think so", False, None),
        ("True... or False", False, True),  # "true" is looked for first, as released
        ("<think>hmm</think>True", True, True),
        ("Reasoning... Answer: False", True, False),
        ("True, but no marker", True, None),
    ],
)
def test_parser(output, think, expected):
    assert parse_tinyv(output, think) is expected


def test_prompt_fills_each_field_once_and_leaves_no_placeholder():
    prompt = tinyv_prompt("What is {{MODEL_ANSWER}}?", r"\frac{1}{2}", "0.5")
    assert prompt.count("<question>What is {{MODEL_ANSWER}}?</question>") == 1
    assert prompt.count(r"<ground_truth_answer>\frac{1}{2}</ground_truth_answer>") == 1
    assert prompt.count("<model_answer>0.5</model_answer>") == 1
    assert "{{QUESTION}}" not in prompt and "{{GROUND_TRUTH_ANSWER}}" not in prompt
    with pytest.raises(ValueError, match="MODEL_ANSWER"):
        TinyV(prompt="{{QUESTION}} {{GROUND_TRUTH_ANSWER}}")


def test_judge_errors_retry_at_raised_temperature_then_score_zero_with_reason():
    judge = FakeJudge(fail=True)
    result = run(["8"], judge)
    assert result.scores == [0.0]
    assert result.reasons[0].startswith("judge failed: 4 attempts failed")
    assert [t for _, t in judge.calls] == [0.0, 0.3, 0.3, 0.3]


def test_unreadable_judge_output_is_a_reasoned_zero():
    result = run(["8"], FakeJudge("maybe"))
    assert result.scores == [0.0]
    assert "unreadable" in result.reasons[0]


def test_cache_asks_once_per_distinct_triple():
    judge = FakeJudge("True")
    reward = TinyV(judge=judge)
    first = reward(batch(["8", "8", "9"]), ctx())
    second = reward(batch(["8", "9"]), ctx())
    answers = sorted(p.split("<model_answer>")[1].split("</model_answer>")[0] for p in judge.prompts)
    assert answers == ["8", "9"]
    assert first.extras["cache_hit"] == [0.0, 1.0, 0.0]
    assert second.extras["cache_hit"] == [1.0, 1.0]
    assert reward.judge.counts["generated"] == 2


def test_decisions_are_logged_per_completion_and_counted_per_run():
    reward = TinyV(judge=FakeJudge(lambda p: "True" if "<model_answer>seven" in p else "False"))
    result = reward(batch(["7", "seven", "8", "9"]), ctx())
    assert result.scores == [1.0, 1.0, 0.0, 0.0]
    assert result.extras["rule"] == [1.0, 0.0, 0.0, 0.0]
    assert result.extras["judged"] == [0.0, 1.0, 1.0, 1.0]
    assert result.extras["flipped"] == [0.0, 1.0, 0.0, 0.0]
    assert result.extras["correct"] == [1.0, 1.0, 0.0, 0.0]
    assert reward.counts["judged_negatives"] == 3 and reward.counts["flipped"] == 1
    assert reward.false_negative_rate == pytest.approx(1 / 3)


def test_addon_never_turns_a_positive_into_a_negative():
    rng = random.Random(0)
    words = ["True", "False", "true false", "", "maybe", "FALSE", "no", "yes", "tRuE!"]
    for _ in range(50):
        answers = [rng.choice(["7", "7.0", "8", "14/2", "x", "seven"]) for _ in range(6)]

        def reply(prompt, rng=rng):
            return rng.choice(words) + "".join(rng.choice("ab \n") for _ in range(rng.randrange(4)))

        weight = rng.choice([0.0, 0.5, 1.0])
        reward = TinyV(judge=FakeJudge(reply), weight=weight)
        b = batch(answers)
        rule = reward.rule(b, ctx()).scores
        scores = reward(b, ctx()).scores
        for r, s in zip(rule, scores, strict=True):
            assert s >= r
            assert s == 1.0 if r == 1.0 else s in (0.0, weight)


def test_judge_model_loads_lazily_and_a_missing_model_stops_with_a_clear_error():
    reward = TinyV(model="/no/such/judge")
    assert reward(batch(["7"]), ctx()).scores == [1.0]  # no rule negative, no judge needed
    with pytest.raises(ModelLoadError):
        reward(batch(["8"]), ctx())


@pytest.mark.slow
def test_real_judge_models_run_end_to_end():
    """TinyV and General-Reasoner with a tiny random LM as the judge: batched greedy generation, chat and raw."""
    from incentive.models import load_tokenizer
    from incentive.rewards.general_reasoner import GeneralReasoner

    tok = load_tokenizer("tiny-random")
    context = RewardContext(tokenizer=tok, tags=TagFormat())
    ex = Example(prompt="3 + 4 =", reference="7")
    texts = ["<answer>7</answer>", "<answer>8</answer>", "<answer>seven</answer>", "no answer"]
    b = RolloutBatch([Completion(0, ex, "3 + 4 =", [1, 2], tok.encode(t), t) for t in texts])
    tinyv = TinyV(model="tiny-random", batch_size=2)(b, context)
    assert tinyv.scores[0] == 1.0 and all(s in (0.0, 1.0) for s in tinyv.scores)
    gr = GeneralReasoner(model="tiny-random", max_new_tokens=6, batch_size=3)(b, context)
    assert len(gr.scores) == 4 and all(-0.5 <= s <= 1.0 for s in gr.scores)
    assert gr.extras["no_answer"] == [0.0, 0.0, 0.0, 1.0]
