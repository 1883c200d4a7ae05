"""Bad recipes, bad ``--set`` overrides and bad eval flags through the command line: each exits 2 with one
``error:`` line saying what is wrong and where (file or flag, key, value, a did-you-mean), before any model
loads and with no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from incentive.advantages import ADVANTAGES
from incentive.cli import main

RECIPE = """
model: {name: tiny-random}
data: {source: task:chain_sum, size: 4}
generation: {num_generations: 2, prompts_per_step: 1, max_new_tokens: 4}
rl: {steps: 1}
"""


def error_line(stderr: str) -> str:
    """The one ``error:`` line of stderr, which holds nothing else (no traceback, no usage, no links)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def train(tmp_path: Path, recipe: str | Path, *overrides: str) -> int:
    args = ["train", str(recipe), "--run-dir", str(tmp_path / "run")]
    return main([*args, *(a for o in overrides for a in ("--set", o))])


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"data: {source: task:chain_sum\n", "not valid YAML: expected ',' or '}'"),
        (b"description: ok\nrl: {steps: 1}  # caf\xe9\n", "not UTF-8 text (byte 0xe9 on line 2)"),
    ],
    ids=["yaml-syntax", "latin-1"],
)
def test_unreadable_recipe_file(content: bytes, words: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert train(tmp_path, path) == 2
    assert error_line(capsys.readouterr().err).startswith(f"error: {path}: {words}")


def test_recipe_path_is_a_folder(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, tmp_path) == 2
    assert error_line(capsys.readouterr().err) == f"error: recipe {tmp_path} is a folder, not a YAML file"


def test_override_value_that_is_not_yaml(recipe: Path, tmp_path: Path, capsys) -> None:
    assert train(tmp_path, recipe, "rl.steps=[") == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: --set rl.steps=[: not valid YAML: "), line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["rl.steps=x"], "error: --set rl.steps=x: rl.steps = 'x': should be a valid integer"),
        (
            ["generation={num_generations: 0}"],
            "error: --set generation={num_generations: 0}: generation.num_generations = 0: "
            "should be greater than or equal to 1",
        ),
        (
            ["generation.num_generation=2"],
            "error: --set generation.num_generation=2: generation.num_generation: unknown key; "
            "did you mean 'num_generations'?",
        ),
        (
            ["rewards=[{name: fromat}]"],
            "error: --set rewards=[{name: fromat}]: rewards[0].name: unknown reward 'fromat'; "
            "did you mean 'format'?",
        ),
        (
            ["generation.engine=vlm"],
            "error: --set generation.engine=vlm: generation.engine: unknown engine 'vlm'; did you mean 'vllm'?",
        ),
        (
            ["optim.schedule=cosin"],
            "error: --set optim.schedule=cosin: optim.schedule = 'cosin': should be 'constant', 'linear' or "
            "'cosine'; did you mean 'cosine'?",
        ),
        (
            ["loss.kl_reference=proxy"],
            "error: RECIPE and --set loss.kl_reference=proxy: loss.kl_reference is 'proxy' but proxy.enabled "
            "is false",
        ),
    ],
    ids=["type", "bound", "unknown-key", "unknown-reward", "unknown-engine", "literal", "cross-check"],
)
def test_bad_override_names_key_value_and_the_set(
    overrides: list[str], expected: str, recipe: Path, tmp_path: Path, capsys
) -> None:
    assert train(tmp_path, recipe, *overrides) == 2
    assert error_line(capsys.readouterr().err).startswith(expected.replace("RECIPE", str(recipe)))
    assert not (tmp_path / "run").exists()


def test_bad_value_in_the_file_names_the_file_not_a_set(recipe: Path, tmp_path: Path, capsys) -> None:
    recipe.write_text(RECIPE + "advantage: {name: gpro}\noptim: {lr: 0}\n")
    assert train(tmp_path, recipe, "rl.steps=2") == 2
    line = error_line(capsys.readouterr().err)
    assert line == (
        f"error: 2 problems: {recipe}: advantage.name: unknown advantage estimator 'gpro'; did you mean 'grpo'? "
        f"| {recipe}: optim.lr = 0: should be greater than 0"
    )


GROUP_ESTIMATORS = [name for name in ADVANTAGES.names() if ADVANTAGES.get(name).min_group_size > 1]


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_one_generation_per_prompt_with_a_group_estimator(
    estimator: str, recipe: Path, tmp_path: Path, capsys
) -> None:
    assert train(tmp_path, recipe, "generation.num_generations=1", f"advantage.name={estimator}") == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(
        f"error: generation.num_generations is 1, but advantage '{estimator}' needs at least 2 completions"
    ), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--max-new-tokens", "0", "expected an integer >= 1, got '0'"),
        ("--batch-size", "0", "expected an integer >= 1, got '0'"),
        ("--samples", "0", "expected an integer >= 1, got '0'"),
        ("--size", "two", "expected an integer >= 1, got 'two'"),
        ("--temperature", "-1", "expected a number >= 0, got '-1'"),
        ("--temperature", "nan", "expected a number >= 0, got 'nan'"),
        ("--top-p", "0", "expected a number > 0 and <= 1, got '0'"),
        ("--judge-max-new-tokens", "-3", "expected an integer >= 1, got '-3'"),
    ],
)
def test_eval_flag_out_of_range(flag: str, value: str, expected: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--model", "tiny-random", "--data", "task:chain_sum", "--size", "1", flag, value])
    assert stop.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert line == f"error: argument {flag}: {expected} (see incentive eval --help)"


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--task-args", "{min_terms: [", "error: --task-args: not valid YAML: "),
        (
            "--template",
            "thnk-answer",
            "error: --template: unknown template 'thnk-answer'; did you mean 'think-answer'?",
        ),
    ],
)
def test_eval_flag_that_does_not_parse_or_is_unknown(flag: str, value: str, expected: str, capsys) -> None:
    assert main(["eval", "--model", "tiny-random", "--data", "task:chain_sum", flag, value]) == 2
    assert error_line(capsys.readouterr().err).startswith(expected)


def test_real_command_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: {steps: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "incentive.cli", "train", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert error_line(proc.stderr).startswith(f"error: {bad}: not valid YAML")
