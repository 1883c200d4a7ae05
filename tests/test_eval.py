"""Evaluation: unbiased pass@k, the summary and its breakdowns, and `incentive eval` on the tiny model."""

import json

import pytest

from incentive.cli import main
from incentive.data import Example
from incentive.evaluation import markdown_report, pass_at_k, summarize_eval
from incentive.rewards.base import RewardResult
from incentive.rollout.types import Completion, RolloutBatch
from incentive.templates import Parsed


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
    captured = capsys.readouterr()
    assert "eval: 100%" in captured.err  # tqdm progress while generating
    assert main([*args, "--k", "4"]) == 2
    assert "--k" in capsys.readouterr().err


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
