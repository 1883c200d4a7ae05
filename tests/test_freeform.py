"""task:freeform (free-form answers with many correct wordings), its worked solutions, and the accepted-wordings
judge: measured against hand labels beside the rule verifier, which misjudges correct paraphrases."""

import json
from pathlib import Path

import pytest

from incentive.cli import main
from incentive.config import ConfigError, load_recipe
from incentive.data import DataConfig, DataError, Example, load_examples, sft_pairs
from incentive.data.freeform import KINDS, freeform_item, number_words
from incentive.evaluation import build_verifier
from incentive.rewards.base import RewardContext
from incentive.rewards.verifier import RuleVerifier, extract_answer
from incentive.rewards.wordings import AcceptedWordings, matches, normalize_wording
from incentive.rollout.types import Completion, RolloutBatch
from incentive.templates import TagFormat

JUDGEMENTS = Path(__file__).parent / "corpus" / "freeform_judgements.jsonl"
RECIPES = Path(__file__).parents[1] / "recipes"


def freeform(size=8, seed=0, **task_args):
    cfg = DataConfig(source="task:freeform", size=size, seed=seed, task_args=task_args)
    return load_examples(cfg).examples


def test_task_is_seeded_and_takes_the_kinds_in_turn():
    examples = freeform(size=12)
    assert [e.prompt for e in examples] == [e.prompt for e in freeform(size=12)]
    assert [e.prompt for e in examples] != [e.prompt for e in freeform(size=12, seed=1)]
    assert [e.domain for e in examples] == list(KINDS) * 3
    first = examples[0]
    assert first.id == "freeform:0:0" and first.metadata["task"] == "freeform"
    assert matches(first.reference, first.metadata["accepted"])
    only = freeform(size=4, kinds=["clock"])
    assert {e.domain for e in only} == {"clock"}


def test_knobs_bound_the_problems():
    for e in freeform(size=40, kinds=["weekday"], max_days=20, days_back=True):
        assert 1 <= e.metadata["params"]["days"] <= 20
    assert any(e.metadata["params"]["back"] for e in freeform(size=40, kinds=["weekday"], days_back=True))
    for e in freeform(size=40, kinds=["compare"], max_value=9):
        assert {e.metadata["params"]["a"], e.metadata["params"]["b"]} <= set(range(1, 10))
    for e in freeform(size=40, kinds=["count"], min_items=3, max_items=4):
        assert len(e.metadata["params"]["items"]) in (3, 4)


def test_references_vary_in_wording_unless_told_not_to():
    varied = freeform(size=40, kinds=["weekday"])
    assert len({e.reference == e.metadata["canonical"] for e in varied}) == 2
    fixed = freeform(size=40, kinds=["weekday"], vary_reference=False)
    assert all(e.reference == e.metadata["canonical"] for e in fixed)


def test_train_and_test_splits_share_no_question():
    train = {e.prompt for e in freeform(size=800, split="train", max_days=13)}
    test = freeform(size=40, seed=7, split="test", distinct=True, max_days=13)
    assert len({e.prompt for e in test}) == 40
    assert not train & {e.prompt for e in test}


@pytest.mark.parametrize(
    ("task_args", "problem"),
    [
        ({"kinds": ["weather"]}, "kinds must be some of"),
        ({"max_days": 0}, "max_days must be 1 to 999"),
        ({"min_items": 5, "max_items": 3}, "min_items <= max_items"),
        ({"bogus": 1}, "unexpected keyword argument 'bogus'"),
        ({"kinds": ["weekday"], "max_days": 1, "split": "test", "distinct": True}, "no new weekday question"),
    ],
)
def test_bad_task_args_name_the_field(task_args, problem):
    where = "task:freeform, field 'task_args': task 'freeform' rejected"
    with pytest.raises(DataError, match=rf"{where} .*{problem}"):
        freeform(size=20, **task_args)


def test_unknown_task_names_both_kinds_of_task():
    with pytest.raises(DataError, match="did you mean freeform.*incentive's own tasks: freeform"):
        load_examples(DataConfig(source="task:freefrom"))


def test_worked_solutions_end_in_the_reference():
    examples = freeform(size=4, max_days=13)
    pairs = sft_pairs(examples, TagFormat(), "task:freeform")
    for example, target in pairs:
        assert target.endswith(f"<answer>\n{example.reference}\n</answer>")
    clock = freeform_item("clock", {"start": 9, "hours": 17})
    assert clock.reasoning.splitlines() == [
        "9 + 17 = 26",
        "26 - 12 = 14 (a clock starts again after 12)",
        "14 - 12 = 2 (a clock starts again after 12)",
    ]
    week = freeform_item("weekday", {"start": 0, "days": 9, "back": False})
    assert week.reasoning.splitlines()[-1] == "Counting 2 days on from Monday: Tuesday, Wednesday."
    metadata = {"task": "freeform", "kind": "weekday", "params": week.params}
    wrong = Example("q", "Friday", "bad", metadata=metadata)
    with pytest.raises(DataError, match="reference 'Friday' is not an accepted wording of 'Wednesday'"):
        sft_pairs([wrong], TagFormat(), "x.jsonl")


def test_number_words():
    assert number_words(7) == ["seven"]
    assert number_words(47) == ["forty-seven"]
    assert number_words(90) == ["ninety"]
    assert number_words(305) == ["three hundred and five", "three hundred five"]


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("It will be a Thursday.", "it will be thursday"),
        ("The answer is: Tuesday", "tuesday"),
        ("It\u2019s 2 o\u2019clock", "its 2 oclock"),
        ("two o' clock", "two oclock"),
        ("forty-seven", "forty seven"),
        ("8:00", "8:00"),
        ("47>38", "47 > 38"),
        ("-5 degrees", "-5 degrees"),
        ("1,200", "1200"),
        ("**Six**!", "six"),
    ],
)
def test_normalize_wording(text, normal):
    assert normalize_wording(text) == normal


def judge(texts, reference="It will be Thursday.", accepted=("Thursday", "it will be Thursday")):
    question = "Today is Monday. What day will it be in 3 days?"
    example = Example(question, reference, metadata={"accepted": list(accepted)})
    batch = RolloutBatch([Completion(0, example, "", [1], [1], text) for text in texts])
    return AcceptedWordings()(batch, RewardContext(tokenizer=None, tags=TagFormat()))


def test_judge_reward_scores_any_accepted_wording():
    result = judge(
        [
            "<think>Tuesday, Wednesday, Thursday.</think><answer>THURSDAY!</answer>",
            "<answer>It will be a Thursday.</answer>",
            "<answer>\\boxed{Thursday}</answer>",
            "<answer>Thursday or Friday</answer>",
            "Thursday",
            "<answer> </answer>",
        ]
    )
    assert result.scores == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert result.extras["correct"] == result.scores
    assert result.reasons[4:] == ["no answer found", "empty answer"]


def test_judge_falls_back_to_the_reference_and_reports_bad_metadata():
    assert judge(["<answer>Paris.</answer>"], reference="paris", accepted=()).scores == [1.0]
    example = Example("q", "x", metadata={"accepted": [1, 2]})
    verdict = AcceptedWordings().verify(example, "x")
    assert verdict.score == 0.0 and "must be a list of strings" in verdict.reason


def test_judge_is_an_eval_verifier_and_a_recipe_setting():
    assert isinstance(build_verifier("accepted_wordings"), AcceptedWordings)
    recipe = load_recipe(RECIPES / "freeform-nover.yaml")
    assert recipe.eval.verifier == "accepted_wordings"
    assert recipe.eval.data.task_args["split"] == "test" and recipe.data.task_args["split"] == "train"
    typo = "eval.verifier: unknown verifier 'accepted_wording'; did you mean 'accepted_wordings'"
    with pytest.raises(ConfigError, match=typo):
        load_recipe(RECIPES / "freeform-nover.yaml", ["eval.verifier=accepted_wording"])


def hand_labelled() -> list[tuple[dict, Example, str | None]]:
    """Each hand-labelled completion with its example (question and accepted wordings rebuilt from the kind and
    parameters) and the answer where the format puts it."""
    out = []
    for line in JUDGEMENTS.read_text().splitlines():
        row = json.loads(line)
        item = freeform_item(row["kind"], row["params"])
        assert matches(row["reference"], item.accepted), row["id"]
        metadata = {"task": "freeform", "kind": row["kind"], "params": row["params"]}
        metadata["accepted"] = item.accepted
        example = Example(item.question, row["reference"], row["id"], row["kind"], metadata=metadata)
        answer = extract_answer(row["completion"], TagFormat().parse(row["completion"]).answer)
        out.append((row, example, answer))
    return out


def test_judge_agrees_with_hand_labels_where_the_rule_verifier_does_not(capsys):
    """The numbers of docs/freeform-task.md: agreement with hand labels, and each verifier's errors by kind."""
    rows = hand_labelled()
    assert len(rows) >= 60
    wordings, rule = AcceptedWordings(), RuleVerifier()
    errors = {"accepted_wordings": {"fn": 0, "fp": 0}, "rule": {"fn": 0, "fp": 0}}
    for row, example, answer in rows:
        for name, verifier in (("accepted_wordings", wordings), ("rule", rule)):
            said = verifier.verify(example, answer).correct
            if said != row["correct"]:
                errors[name]["fn" if row["correct"] else "fp"] += 1
    n, positives = len(rows), sum(row["correct"] for row, _, _ in rows)
    agreement = {name: 1 - (e["fn"] + e["fp"]) / n for name, e in errors.items()}
    with capsys.disabled():
        print(f"\n{n} hand-labelled completions, {positives} correct")
        for name, e in errors.items():
            errs = f"false negatives {e['fn']}, false positives {e['fp']}"
            print(f"{name}: agreement {agreement[name]:.1%} ({errs})")
    assert agreement["accepted_wordings"] >= 0.85
    assert errors["accepted_wordings"]["fp"] == 0
    assert agreement["rule"] <= agreement["accepted_wordings"] - 0.3
    assert errors["rule"]["fn"] >= positives / 2


def test_incentive_eval_judges_with_the_accepted_wordings(tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", "tiny-random", "--data", "task:freeform", "--task-args", "{split: test}"]
    args += ["--size", "2", "--max-new-tokens", "4", "--verifier", "accepted_wordings", "--out", str(out)]
    assert main(args) == 0
    assert "AcceptedWordings" in capsys.readouterr().err
    assert json.loads(out.read_text())["verifier"] == "accepted_wordings"
