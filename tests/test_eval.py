"""Evaluation: unbiased pass@k, the summary, its intervals and breakdowns, strict vs any-format correctness,
`incentive eval` on the tiny model (every completion saved) and `incentive compare` on saved evals."""

import json
from pathlib import Path

import pytest

from incentive.cli import main
from incentive.data import Example
from incentive.evaluation import (
    judge_lenient,
    lenient_answer,
    markdown_report,
    pass_at_k,
    summarize_eval,
    write_completions,
)
from incentive.rewards.base import RewardContext, RewardResult
from incentive.rewards.verifier import RuleVerifier
from incentive.rollout.types import Completion, RolloutBatch
from incentive.stats import CLUSTERED, WILSON
from incentive.templates import Parsed, TagFormat


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),
        (5, 2, 2, 0.7),
        (5, 0, 3, 0.0),
        (5, 4, 2, 1.0),
        (5, 5, 5, 1.0),
        (10, 3, 5, 1 - 21 / 252),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_summary_and_breakdowns():
    easy = Example("1+1", "2", "a", domain="arith", difficulty=1.0)
    hard = Example("d/dx x^2", "2x", "b", domain="calculus", difficulty=3.0)
    lengths = [4, 8, 2, 6, 10, 1]
    batch = RolloutBatch(
        [
            Completion(g, ex, "", [1], [0] * n, "t")
            for (g, ex), n in zip([(0, easy)] * 3 + [(1, hard)] * 3, lengths, strict=True)
        ]
    )
    correct = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    result = RewardResult([0.9, 1.0, 0.0, 0.0, 0.5, 1.0], extras={"correct": correct})
    parsed = [Parsed("r", "a", True)] * 4 + [Parsed(None, None, False)] * 2
    summary = summarize_eval(batch, result, parsed, ks=(1, 2, 3))
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["pass@1"] == pytest.approx(0.5)
    assert summary["pass@2"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert summary["pass@3"] == 1.0
    assert summary["format_rate"] == pytest.approx(4 / 6)
    assert (summary["length_p50"], summary["length_p90"], summary["length_max"]) == (4, 10, 10)
    arith = summary["by_domain"]["arith"]
    assert (arith["prompts"], arith["n"], arith["pass@2"], arith["pass@3"]) == (1, 3, 1.0, 1.0)
    assert arith["accuracy"] == pytest.approx(2 / 3) and arith["pass@1"] == pytest.approx(2 / 3)
    assert set(summary["by_difficulty"]) == {"1", "3"}
    table = markdown_report(summary)
    assert "| pass@2 |" in table and "| calculus |" in table


def _read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_cli_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["eval", "--model", "tiny-random", "--data", "task:chain_sum", "--size", "2", "--samples", "3"]
    code = main([*args, "--k", "1", "3", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert {"accuracy", "pass@1", "pass@3", "format_rate", "length_p90", "by_domain", "by_difficulty"} <= set(
        report
    )
    assert report["n"] == 6 and report["prompts"] == 2 and report["temperature"] == 1.0
    assert report["by_domain"]["chain_sum"]["prompts"] == 2
    assert "| pass@3 |" in (out / "eval.md").read_text()
    assert report["ci_method"] == CLUSTERED and len(report["accuracy_ci"]) == 2
    assert {"accuracy_lenient", "accuracy_lenient_ci", "format_rate_ci"} <= set(report)
    assert (report["seed"], report["sampling_seed"]) == (1, 0)
    assert report["completions_file"] == "eval.completions.jsonl"
    records = _read_lines(out / "eval.completions.jsonl")
    assert [r["id"] for r in records] == ["chain_sum:1:0", "chain_sum:1:1"]
    assert all(len(r["completions"]) == 3 and r["reference"] for r in records)
    fields = {"text", "answer", "answer_lenient", "correct", "correct_lenient", "format_ok", "score"}
    assert all(fields <= set(c) for r in records for c in r["completions"])
    captured = capsys.readouterr()
    assert "eval: 100%" in captured.err  # tqdm progress while generating
    assert "correct regardless of format" in captured.out and "95% CI" in captured.out
    assert main([*args, "--k", "4"]) == 2
    assert "--k" in capsys.readouterr().err
    # another sampling seed: the same task prompts, other completions; the two compare prompt by prompt
    again = tmp_path / "again"
    assert main([*args, "--max-new-tokens", "4", "--sampling-seed", "5", "--out", str(again)]) == 0
    resampled = _read_lines(again / "eval.completions.jsonl")
    assert [(r["id"], r["prompt"]) for r in resampled] == [(r["id"], r["prompt"]) for r in records]
    texts = [[c["text"] for c in r["completions"]] for r in records]
    assert [[c["text"] for c in r["completions"]] for r in resampled] != texts
    capsys.readouterr()
    assert main(["compare", str(out), str(again)]) == 0
    assert "2 prompts matched by id" in capsys.readouterr().out


def test_eval_cli_on_a_lora_adapter_folder(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from incentive.models import load_model

    model = load_model("tiny-random")  # not the shared fixture: LoRA wraps it in place
    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(adapter)  # adapter files only: no config.json, no tokenizer
    args = [
        "eval",
        "--model",
        str(adapter),
        "--data",
        "task:chain_sum",
        "--size",
        "1",
        "--max-new-tokens",
        "2",
    ]
    assert main(args) == 0
    assert '"accuracy"' in capsys.readouterr().out


def _batch(texts_by_prompt, examples):
    """Completions of each example, group id = the example's position."""
    return RolloutBatch(
        [
            Completion(g, ex, "", [1], [0] * 3, text)
            for g, (ex, texts) in enumerate(zip(examples, texts_by_prompt, strict=True))
            for text in texts
        ]
    )


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<think>12 + 7 = 19</think><answer>19</answer>", "19"),
        ("so \\boxed{19}", "19"),
        ("<think>12 + 7</think><answer>19", "19"),  # the answer block never closed
        ("The final answer is: 19.", "19"),
        ("<think>12 + 7 = 19</think> that makes 19", "19"),  # the last number
        ("Paris", "Paris"),
        ("", None),
    ],
)
def test_lenient_answer(text, answer):
    assert lenient_answer(text, TagFormat().parse(text).answer) == answer


def test_correct_regardless_of_format_is_apart_from_strict_accuracy():
    example = Example("12 + 7 =", "19", "p0")
    texts = [
        "<think>12 + 7 = 19</think><answer>19</answer>",  # right, well formatted
        "12 + 7 = 19",  # right, no tags: correct regardless of format only
        "<answer>19</answer>",  # right in its answer block, no reasoning block: strictly right, format fails
        "<think>12 + 7 = 20</think><answer>20</answer>",  # wrong, well formatted
    ]
    batch = _batch([texts], [example])
    ctx = RewardContext(None, TagFormat())
    verifier = RuleVerifier()
    result = verifier(batch, ctx)
    parsed = ctx.parsed(batch)
    lenient = judge_lenient(batch, parsed, [True, False, True, False], verifier, None, TagFormat())
    assert lenient.correct == [True, True, True, False]
    assert lenient.answers == ["19", "19", "19", "20"]
    summary = summarize_eval(batch, result, parsed, lenient=lenient)
    assert (summary["accuracy"], summary["accuracy_lenient"], summary["format_rate"]) == (0.5, 0.75, 0.5)
    (record,) = summary["per_prompt"]
    assert (record["id"], record["prompt"], record["reference"]) == ("p0", "12 + 7 =", "19")
    assert [c["text"] for c in record["completions"]] == texts
    assert [c["correct"] for c in record["completions"]] == [True, False, True, False]
    assert [c["correct_lenient"] for c in record["completions"]] == [True, True, True, False]
    assert [c["format_ok"] for c in record["completions"]] == [True, False, False, True]
    assert [c["answer"] for c in record["completions"]] == ["19", None, "19", "20"]


def test_summary_intervals_are_wilson_for_one_sample_per_prompt():
    examples = [Example(f"q{i}", "1", f"p{i}") for i in range(10)]
    texts = [["<think>t</think><answer>1</answer>"]] * 3 + [["<think>t</think><answer>2</answer>"]] * 7
    batch = _batch(texts, examples)
    correct = [1.0] * 3 + [0.0] * 7
    summary = summarize_eval(batch, RewardResult(correct), [TagFormat().parse(t) for (t,) in texts])
    # Wilson 3/10 by hand: denom 1 + z²/10 = 1.384146, centre (0.3 + 0.192073)/denom = 0.355507,
    # half z·sqrt(0.021 + 0.0096037)/denom = 0.342874/denom = 0.247716; 10/10 formatted: 0.861234 ± 0.138766
    assert summary["accuracy_ci"] == pytest.approx([0.107791, 0.603222], abs=1e-6)
    assert summary["format_rate_ci"] == pytest.approx([0.722468, 1.0], abs=1e-6)
    assert summary["ci_method"] == WILSON
    assert summary["accuracy_lenient"] == summary["accuracy"]  # no lenient pass: the strict verdicts


def _write_eval(path, outcomes, prompt="q{}"):
    """A saved eval: prompt i's completions right or wrong as in ``outcomes[i]``."""
    records = [
        {
            "id": f"t:{i}",
            "prompt": prompt.format(i),
            "reference": "1",
            "completions": [
                {"text": "", "correct": ok, "correct_lenient": True, "format_ok": ok} for ok in row
            ],
        }
        for i, row in enumerate(outcomes)
    ]
    write_completions(records, path)
    return path


def test_compare_two_saved_evals(tmp_path, capsys):
    # McNemar table of test_stats: 8 right under both, 3 wrong under both, 2 right only in A, 7 only in B
    a = [[True]] * 8 + [[False]] * 3 + [[True]] * 2 + [[False]] * 7
    b = [[True]] * 8 + [[False]] * 3 + [[False]] * 2 + [[True]] * 7
    path_a = _write_eval(tmp_path / "a" / "eval.completions.jsonl", a)
    path_b = _write_eval(tmp_path / "b.completions.jsonl", b)
    path_b.write_text("".join(reversed(path_b.read_text().splitlines(keepends=True))))  # paired by id
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "20 prompts matched by id" in out
    assert "B - A: +25.0 points, 95% CI -3.8 to +49.3 points" in out
    assert "McNemar exact (binomial): B better on 7 prompts, A better on 2, p = 0.18" in out
    assert "not significant at 5 %" in out
    assert main(["compare", str(path_a), str(path_b), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["rate_a"], result["rate_b"], result["diff"]) == pytest.approx((0.5, 0.75, 0.25))
    assert result["p_value"] == pytest.approx(92 / 512) and result["significant"] is False
    assert main(["compare", str(path_a), str(path_b), "--metric", "lenient", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["diff"] == 0.0


def test_compare_with_several_samples_is_significant(tmp_path, capsys):
    path_a = _write_eval(tmp_path / "a.completions.jsonl", [[False, False, True]] * 12)
    path_b = _write_eval(tmp_path / "b.completions.jsonl", [[True, True, False]] * 12)
    assert main(["compare", str(path_a), str(path_b)]) == 0
    out = capsys.readouterr().out
    assert "exact sign test on per-prompt accuracy differences: B better on 12 prompts, A better on 0" in out
    assert "significant at 5 %: B's accuracy (strict) is higher than A's" in out


def test_compare_refuses_other_prompts(tmp_path, capsys):
    path_a = _write_eval(tmp_path / "a.completions.jsonl", [[True]] * 3)
    fewer = _write_eval(tmp_path / "b.completions.jsonl", [[True]] * 2)
    other_text = _write_eval(tmp_path / "c.completions.jsonl", [[True]] * 3, prompt="other {}")
    for other in (fewer, other_text, tmp_path / "missing.completions.jsonl"):
        assert main(["compare", str(path_a), str(other)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert main(["compare", str(path_a), str(fewer)]) == 2
    assert "not over the same prompts: 1 prompt ids only in the first" in capsys.readouterr().err


def test_run_evals_state_intervals_and_save_completions(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    settings = ["model.name=tiny-random", "sft.steps=1", "sft.batch_size=2", "rl.steps=0", "data.size=8"]
    settings += ["eval.data.size=3", "eval.max_new_tokens=4"]
    args = ["train", "recipes/demo.yaml", "--run-dir", str(tmp_path / "run")]
    assert main([*args, *(x for s in settings for x in ("--set", s))]) == 0
    out = capsys.readouterr().out
    assert "[eval base] accuracy 0.0% [0.0%, 56.1%]  any format" in out  # Wilson 0/3: [0, z²/(3 + z²)]
    evals = json.loads((tmp_path / "run" / "evals.json").read_text())
    assert evals["sft"]["completions_file"] == "evals/sft.completions.jsonl"
    assert "per_prompt" not in evals["sft"]
    assert evals["base"]["sampling_seed"] == 7919 and evals["base"]["ci_method"] == WILSON
    base, sft = (tmp_path / "run" / "evals" / f"{key}.completions.jsonl" for key in ("base", "sft"))
    assert [len(r["completions"]) for r in _read_lines(base)] == [1, 1, 1]
    assert main(["compare", str(base), str(sft), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == 3


def test_run_compares_rl_with_the_stage_it_started_from(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    settings = ["model.name=tiny-random", "sft.steps=1", "sft.batch_size=2", "rl.steps=1", "data.size=8"]
    settings += ["eval.data.size=3", "eval.max_new_tokens=4", "generation.max_new_tokens=4"]
    args = ["train", "recipes/demo.yaml", "--run-dir", str(tmp_path / "run")]
    assert main([*args, *(x for s in settings for x in ("--set", s))]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "comparison.json").read_text())
    assert (saved["a_stage"], saved["b_stage"], saved["prompts"]) == ("sft", "rl", 3)
    assert saved["a"].endswith("sft.completions.jsonl") and saved["b"].endswith("rl.completions.jsonl")
    assert "RL - SFT on the same 3 prompts:" in out and f"p = {saved['p_value']:.3g}" in out
