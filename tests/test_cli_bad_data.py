"""The bad-input corpus (tests/corpus/bad_data, described by its manifest.json) run through the command line:
`incentive train` and `incentive eval` exit 2 with one clear error naming file, row and field, and leave any run
folder already there untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from incentive.cli import main

CORPUS = Path(__file__).parent / "corpus" / "bad_data"
CASES: list[dict[str, Any]] = json.loads((CORPUS / "manifest.json").read_text())
RECIPE = """
model: {name: tiny-random}
data: {source: placeholder.jsonl}
generation: {num_generations: 2, prompts_per_step: 1, max_new_tokens: 4}
rewards: [{name: format}, {name: verifier}]
rl: {steps: 1}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return str(path)


def train(recipe: str, run_dir: Path, source: Path | str, *extra: str) -> int:
    return main(["train", recipe, "--run-dir", str(run_dir), "--set", f"data.source={source}", *extra])


def expected_location(case: dict[str, Any]) -> str:
    where = str(CORPUS / case["file"])
    if case["row"] is not None:
        where += f", row {case['row']}"
    if case["field"] is not None:
        where += f", field '{case['field']}'"
    return where


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_corpus_covers_the_issue_list() -> None:
    files = {case["file"] for case in CASES}
    assert {p.name for p in CORPUS.iterdir()} - {"manifest.json"} == files
    kinds = " ".join(case["what"] for case in CASES)
    for kind in ("Latin-1", "cut off", "without its reference", "blank", "wrong type", "twice", "context"):
        assert kind in kinds
    assert {"garbage.jsonl", "empty.jsonl"} <= files


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_train_names_file_row_and_field(case: dict[str, Any], recipe: str, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert train(recipe, run_dir, CORPUS / case["file"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {expected_location(case)}: "), line
    assert case["words"] in line
    assert not run_dir.exists()


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_eval_names_file_row_and_field(case: dict[str, Any], capsys) -> None:
    code = main(
        ["eval", "--model", "tiny-random", "--data", str(CORPUS / case["file"]), "--max-new-tokens", "4"]
    )
    assert code == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {expected_location(case)}: "), line
    assert case["words"] in line


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_bad_data_leaves_an_existing_run_untouched(flag: str, recipe: str, tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        "".join(json.dumps({"prompt": f"{i} + {i} =", "reference": str(2 * i)}) + "\n" for i in range(3))
    )
    run_dir = tmp_path / "run"
    assert train(recipe, run_dir, good) == 0
    before = folder_digest(run_dir)
    assert train(recipe, run_dir, CORPUS / "truncated.jsonl", flag) == 2
    assert "truncated.jsonl, row 3" in capsys.readouterr().err
    assert folder_digest(run_dir) == before


def test_skip_mode_trains_on_the_good_rows_and_counts_the_rest(recipe: str, tmp_path: Path, capsys) -> None:
    mixed = tmp_path / "mixed.jsonl"
    rows = [
        json.loads(line)
        for name in ("missing-reference.jsonl", "too-long-prompt.jsonl")
        for line in (CORPUS / name).read_text().splitlines()
    ]
    mixed.write_text("".join(json.dumps({**row, "id": str(i)}) + "\n" for i, row in enumerate(rows)))
    run_dir = tmp_path / "run"
    assert train(recipe, run_dir, mixed, "--set", "data.on_error=skip", "--set", "rl.steps=3") == 0
    out = capsys.readouterr().out
    assert "data: skipped 2 bad rows" in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    prompts = {s["prompt"] for r in records for s in r.get("samples", [])}
    assert prompts <= {"What is 1 + 1?", "What is 3 + 3?"}

    code = main(
        [
            "eval",
            "--model",
            "tiny-random",
            "--data",
            str(mixed),
            "--on-error",
            "skip",
            "--max-new-tokens",
            "4",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped 1 prompts too long" in out and '"prompts": 3' in out


def test_real_command_exits_2_with_the_message_on_stderr(tmp_path: Path) -> None:
    bad = CORPUS / "duplicate-id.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "incentive.cli", "eval", "--model", "tiny-random", "--data", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert error_line(proc.stderr).startswith(f"error: {bad}, row 3, field 'id': duplicate id 'a'")
    assert "Traceback" not in proc.stderr
