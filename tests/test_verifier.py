import threading
import time

import pytest

from incentive.data import Example
from incentive.rewards import verifier as verifier_module
from incentive.rewards.base import RewardContext
from incentive.rewards.verifier import (
    CheckTimeout,
    RuleVerifier,
    check_answer,
    extract_answer,
    last_boxed,
    parse_quantity,
    run_limited,
)
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


# -- hardened rule verifier ------------------------------------------------------------------------------------


def test_last_boxed_handles_any_nesting_and_unclosed_boxes():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None
    assert extract_answer("x", r"so \boxed{42}") == "42"


@pytest.mark.parametrize(
    ("reference", "answer", "expected"),
    [
        ("1/2", "0.5", True),
        ("0.75", r"\frac{3}{4}", True),
        ("1000000", "1000000.5", True),  # within the relative tolerance
        ("2", "2.01", False),
        ("86400", "86,400", True),
        ("-2.5", "\u22122.5", True),
        ("12 m", "12 meters", True),
        ("12 m", "12", True),  # a missing unit is fine
        ("12 m", "12 cm", False),
        ("3x", "3", False),  # algebra, not a unit
        ("25%", "0.25", True),
        ("25%", "25", True),
        ("25%", "2.5", False),
        (r"\$15", "15 dollars", True),
        (r"90^\circ", "90 degrees", True),
        (r"\{-2, 2\}", r"\{2, -2\}", True),
        ("x^2+2x+1", "(x+1)^{2}", True),
        ("x^2+2x+1", "x^2+x+1", False),
        ("5", "x = 5", True),
        ("Pacific Ocean", "pacific ocean.", True),
        ("Paris", "Pairs", False),  # math-verify alone reads both as the product p·a·r·i·s
    ],
)
def test_equivalences(reference, answer, expected):
    assert check_answer(reference, answer).correct is expected


@pytest.mark.parametrize(
    ("reference", "answer", "expected"),
    [("B", "Jupiter", True), ("B", "(b)", True), ("Jupiter", "Option B", True), ("B", "Mars", False)],
)
def test_choice_letters_and_option_text(reference, answer, expected):
    assert check_answer(reference, answer, choices=["Mars", "Jupiter", "Venus"]).correct is expected


def test_choices_from_metadata_and_unmatched_choice_is_reasoned():
    scores, reasons = score(
        ["<answer>(C)</answer>", "<answer>purple</answer>"],
        reference="Whale",
        metadata={"choices": {"C": "Whale"}},
    )
    assert scores == [1.0, 0.0]
    assert reasons[1] == "answer names none of the choices"


def test_answer_type_string_skips_math():
    scores, _ = score(
        ["<answer>paris</answer>", "<answer>Lyon</answer>"],
        reference="Paris",
        metadata={"answer_type": "string"},
    )
    assert scores == [1.0, 0.0]


def test_quantities():
    assert parse_quantity("1,200 m") == (1200.0, "m")
    assert parse_quantity("3/4") == (0.75, None)
    assert parse_quantity("3/0") is None
    assert parse_quantity("2x") is None


def test_parse_failures_are_reasoned_zeros():
    scores, reasons = score(
        ["<answer>\\frac{{{</answer>", "<answer>   </answer>", "<answer>" + "9" * 3000 + "</answer>"]
    )
    assert scores == [0.0, 0.0, 0.0]
    assert all(reasons), reasons


def test_timeout_on_main_thread_is_fast():
    start = time.perf_counter()
    with pytest.raises(CheckTimeout):
        run_limited(time.sleep, (5,), 0.2)
    assert time.perf_counter() - start < 1.0


def test_a_hanging_check_is_a_reasoned_zero_within_the_limit(monkeypatch):
    monkeypatch.setattr(verifier_module, "check_answer", lambda *args: time.sleep(10))
    start = time.perf_counter()
    result = RuleVerifier(timeout_s=0.3)(batch(["<answer>7</answer>"]), RewardContext(None, TagFormat()))
    assert time.perf_counter() - start < 1.5
    assert result.scores == [0.0]
    assert result.reasons[0].startswith("check timed out")
    assert result.extras["timeout"] == [1.0]


def test_a_real_hang_is_cut_on_the_main_thread_and_off_it():
    """9^(9^(9^9)) sends sympy into an endless evaluation; off the main thread a helper process is killed."""
    hang = batch(["<answer>9^{9^{9^{9}}}</answer>"])
    verifier = RuleVerifier(timeout_s=0.5)
    start = time.perf_counter()
    assert verifier(hang, RewardContext(None, TagFormat())).reasons[0].startswith("check timed out")
    assert time.perf_counter() - start < 1.5
    out = {}

    def work():
        def ctx():
            return RewardContext(None, TagFormat())

        out["warm"] = verifier(batch(["<answer>7</answer>"]), ctx()).scores  # starts the helper, not timed
        start = time.perf_counter()
        out["hang"] = verifier(hang, ctx())
        out["seconds"] = time.perf_counter() - start
        out["after"] = verifier(batch(["<answer>8</answer>", "<answer>14/2</answer>"]), ctx()).scores

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(90)
    assert out["warm"] == [1.0]
    assert out["hang"].scores == [0.0] and out["hang"].reasons[0].startswith("check timed out")
    assert out["seconds"] < 3.0
    assert out["after"] == [0.0, 1.0]  # a fresh helper replaced the killed one


def test_time_limit_off_the_main_thread_for_any_picklable_function():
    out = {}

    def work():
        try:
            run_limited(time.sleep, (30,), 0.5)
        except CheckTimeout:
            out["timed_out"] = True
        out["after"] = run_limited(abs, (-3,), 60)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(90)
    assert out == {"timed_out": True, "after": 3}


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="timeout_s"):
        RuleVerifier(timeout_s=0)


def test_an_overrunning_check_is_killed_even_where_the_parent_ignores_sigterm(tmp_path):
    """The helper's kill is a SIGTERM; a process that ignores SIGTERM (the CLI after a stop request) passes that
    on to the helpers it starts, which must still die when a check overruns, or the caller waits forever."""
    import subprocess
    import sys

    script = tmp_path / "ignoring.py"
    script.write_text(
        "import signal, threading, time\n"
        "from incentive.rewards.verifier import CheckTimeout, run_limited\n"
        "out = {}\n"
        "def work():\n"
        "    try:\n"
        "        run_limited(time.sleep, (60,), 0.5)\n"
        "    except CheckTimeout:\n"
        "        out['timed_out'] = True\n"
        "    out['after'] = run_limited(abs, (-3,), 60)\n"
        "if __name__ == '__main__':\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    thread = threading.Thread(target=work)\n"
        "    thread.start()\n"
        "    thread.join()\n"
        "    print(out)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "{'timed_out': True, 'after': 3}", done.stderr[-2000:]
