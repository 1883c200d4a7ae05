"""Group-level rewards against their specs' worked numbers: Pixel Reasoner's curiosity bonus
(methods/pixel-reasoner.md), 360-R1's similarity rewards (methods/360-r1.md) and AvatarShield's temporal
compensation (methods/avatarshield.md)."""

import random

import pytest
import torch

from incentive.advantages import ADVANTAGES
from incentive.config import RewardConfig
from incentive.data import Example
from incentive.rewards.base import RewardContext
from incentive.rewards.curiosity import CuriosityBonus, curiosity_terms
from incentive.rewards.pipeline import RewardPipeline
from incentive.rewards.similarity import AnswerSimilarity, ReasoningSimilarity, similarity
from incentive.rewards.temporal import TemporalCompensation, shuffle_frames, temporal_pass
from incentive.rollout.types import Completion, RolloutBatch
from incentive.templates import TagFormat

CALL = '<tool_call>{"name": "zoom"}</tool_call>'


def batch(texts, example=None, groups=None):
    ex = example or Example("q", "7")
    groups = groups or [0] * len(texts)
    return RolloutBatch([Completion(g, ex, "", [1], [1], t) for g, t in zip(groups, texts, strict=True)])


def ctx(**kw):
    return RewardContext(None, TagFormat(), **kw)


# -- Pixel Reasoner ----------------------------------------------------------------------------------------------


def test_rapr_and_paper_form():
    terms, rapr = curiosity_terms([0, 0, 1, 3, 0, 0, 0, 0])
    assert rapr == 0.25
    assert terms == pytest.approx([0, 0, 0.025, 0.025 - 0.1, 0, 0, 0, 0])


def test_release_form_and_video():
    assert curiosity_terms([1, 1, 0, 0, 0, 0, 0, 0], form="release")[0][0] == pytest.approx(0.025)
    assert curiosity_terms([1] + [0] * 7, form="release")[0][0] == pytest.approx(0.175)
    video = curiosity_terms([1] + [0] * 7, alpha=2 / 3, form="release")[0][0]
    assert video == pytest.approx((0.175 / 1.5) / 0.125 * 0.25)


def test_threshold_and_penalty_only():
    terms, rapr = curiosity_terms([1, 1, 2, 0])
    assert rapr == 0.75
    assert terms == pytest.approx([0, 0, -0.05, 0])


def test_curiosity_reward_is_per_group_and_advantages_sum_to_zero():
    texts = [f"<think>{CALL}</think><answer>7</answer>", "<answer>8</answer>", "<answer>7</answer>", "x"]
    texts += [f"{CALL}{CALL}", CALL, "a", "b"]
    result = CuriosityBonus()(batch(texts, groups=[0] * 4 + [1] * 4), ctx())
    assert result.extras["rapr"] == [0.25] * 4 + [0.5] * 4
    assert result.scores == pytest.approx([0.025, 0, 0, 0, -0.05, 0, 0, 0])
    adv = ADVANTAGES.get("dr_grpo")()(torch.tensor([1.025, 0, 1, 0]), [0] * 4)
    assert float(adv.sum()) == pytest.approx(0.0, abs=1e-6)
    assert adv[0] == pytest.approx(1.025 - 0.50625)


# -- 360-R1 ------------------------------------------------------------------------------------------------------


def test_similarity_bounds():
    assert similarity([("the lamp is left", "the lamp is left")], "tfidf") == pytest.approx([1.0])
    assert similarity([("red apple", "blue sky")], "tfidf") == [0.0]
    assert similarity([("a b c", "a b d")], "token_f1") == pytest.approx([2 / 3])


def test_embedding_backend_loads_offline_and_ranks_paraphrases():
    same, para, other = similarity(
        [
            ("The lamp is left of the door.", "The lamp is left of the door."),
            ("The lamp is left of the door.", "The lamp stands to the left of the door."),
            ("The lamp is left of the door.", "Bananas are rich in potassium."),
        ]
    )
    assert same == pytest.approx(1.0, abs=1e-4)
    assert para > 0.8 > other >= 0.0


def test_reasoning_similarity_gates():
    ex = Example("q", "left", metadata={"reasoning": "the lamp is at 300 degrees so it is left"})
    texts = [
        "<think>the lamp is at 300 degrees so it is left</think><answer>left</answer>",
        "<think>the lamp is at 300 degrees so it is left</think><answer>left</answer> trailing",
        "<think>bananas</think><answer>left</answer>",
    ]
    result = ReasoningSimilarity(backend="tfidf")(batch(texts, ex), ctx())
    assert result.scores[0] == pytest.approx(1.0)
    assert result.scores[1] == 0.0 and result.reasons[1] == "format invalid"
    assert result.scores[2] == 0.0
    missing = ReasoningSimilarity(backend="tfidf")(batch(texts[:1], Example("q", "left")), ctx())
    assert missing.scores == [0.0] and missing.reasons == ["no reference reasoning"]


def test_answer_similarity_closed_and_free_form():
    closed = AnswerSimilarity(backend="tfidf")(
        batch(["<answer>Yes.</answer>", "<answer>no</answer>"], Example("q", "yes")), ctx()
    )
    assert closed.scores == [1.0, 0.0]
    free = Example("q", "a red lamp near the door")
    texts = ["<answer>a red lamp near the door</answer>", "<answer>a red lamp</answer>", "none"]
    continuous = AnswerSimilarity(backend="tfidf")(batch(texts, free), ctx())
    assert continuous.scores[0] == pytest.approx(1.0) and 0 < continuous.scores[1] < 0.8
    assert continuous.reasons[2] == "no answer block"
    assert AnswerSimilarity(backend="tfidf", threshold=0.8)(batch(texts, free), ctx()).scores == [
        1.0,
        0.0,
        0.0,
    ]


def test_weighted_total_and_the_anti_hacking_probe():
    pipeline = RewardPipeline(
        [
            RewardConfig(name="format"),
            RewardConfig(name="reasoning_similarity", args={"backend": "tfidf"}),
            RewardConfig(name="answer_similarity", weight=2.0, args={"backend": "tfidf"}),
        ]
    )
    reference = "The lamp is at 300 degrees. Facing 0 degrees that is 300 degrees, so it is on the left."
    ex = Example("q", "left", metadata={"reasoning": reference})
    hacked = f"<think>{reference}</think><answer>right</answer>"
    honest = "<think>300 is between 225 and 315</think><answer>left</answer>"
    scored = pipeline(batch([hacked, honest], ex), ctx())
    for i in range(2):
        parts = scored.components
        expected = parts["format"][i] + parts["reasoning_similarity"][i] + 2 * parts["answer_similarity"][i]
        assert scored.total[i] == pytest.approx(expected)
    assert scored.total[0] <= scored.total[1]  # copying the reference reasoning does not beat a right answer


# -- AvatarShield ------------------------------------------------------------------------------------------------


CLIP = (
    "Frames of a clip:\n"
    + "\n".join(f"f{k}: person x={2 * k} face=A" for k in range(1, 9))
    + "\nReal or fake?"
)


def test_temporal_rule():
    assert temporal_pass(0.75, 0.5, "ratio", 0.8, 0.1, fake=False)
    assert not temporal_pass(0.3, 0.5, "ratio", 0.8, 0.1, fake=False)
    assert temporal_pass(0.0, 0.0, "ratio", 0.8, 0.1, fake=False)  # p̃ = 0: the rule passes trivially
    assert temporal_pass(0.75, 0.5, "margin", 0.8, 0.1, fake=False)
    assert not temporal_pass(0.55, 0.5, "margin", 0.8, 0.1, fake=False)
    assert not temporal_pass(0.75, 0.5, "fake_only", 0.8, 0.1, fake=False)


def test_shuffle_is_never_the_identity_and_renumbers():
    for seed in range(50):
        shuffled = shuffle_frames(CLIP, random.Random(seed))
        lines = shuffled.split("\n")
        assert lines[0] == "Frames of a clip:" and lines[-1] == "Real or fake?"
        assert [line.split(":")[0] for line in lines[1:9]] == [f"f{k}" for k in range(1, 9)]
        assert shuffled != CLIP
        assert sorted(x.split(":")[1] for x in lines[1:9]) == sorted(
            x.split(":")[1] for x in CLIP.split("\n")[1:9]
        )
    assert shuffle_frames("f1: same\nf2: same", random.Random(0)) is None


def test_temporal_bonus_with_shuffled_rollouts():
    asked = []

    def generate(examples, n):
        asked.append((examples, n))
        # shuffled clips are answered right half of the time: p̃ = 0.5
        return RolloutBatch(
            [
                Completion(g, e, "", [1], [1], "<answer>Fake.</answer>" if k % 2 else "<answer>real</answer>")
                for g, e in enumerate(examples)
                for k in range(n)
            ]
        )

    ex = Example(CLIP, "fake", id="clip")
    texts = ["<answer>fake</answer>"] * 3 + ["<answer>real</answer>"]  # p = 0.75 ≥ 0.8 · 0.5
    texts += ["<answer>fake</answer>"] + ["<answer>real</answer>"] * 3  # p = 0.25 < 0.4
    result = TemporalCompensation()(batch(texts, ex, [0] * 4 + [1] * 4), ctx(generate=generate))
    assert result.scores == pytest.approx([0.3, 0.3, 0.3, 0, 0, 0, 0, 0])
    assert result.extras["temporal_pass"] == [1.0] * 4 + [0.0] * 4
    assert result.extras["p_shuffled"] == [0.5] * 8
    ((examples, n),) = asked
    assert n == 2 and len(examples) == 2  # G̃ = G/2 per group, one call for the batch
    assert all(e.prompt != CLIP and e.id == "clip:shuffled" for e in examples)


def test_temporal_bonus_needs_extra_rollouts():
    with pytest.raises(ValueError, match="extra rollouts"):
        TemporalCompensation()(batch(["<answer>fake</answer>"], Example(CLIP, "fake")), ctx())
