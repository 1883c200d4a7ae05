"""Data stage: file formats, bad-data errors that name file/row/field, reasoning-gym tasks, worked solutions."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from incentive.config import ConfigError, load_recipe
from incentive.data import (
    DataConfig,
    DataError,
    Example,
    LoadResult,
    MissingSolutions,
    keep_usable,
    load_examples,
    sft_pairs,
)
from incentive.data.solutions import WORKED_SOLUTIONS, arithmetic_steps
from incentive.templates import TagFormat

ROWS: list[dict[str, Any]] = [
    {"id": "a", "prompt": "What is 2+2?", "reference": "4", "domain": "math", "difficulty": 0.5, "note": "x"},
    {
        "id": "b",
        "prompt": "Capital of France?",
        "reference": "Paris",
        "domain": "geo",
        "difficulty": 1,
        "note": "y",
    },
    {"id": "c", "prompt": "3*3?", "reference": "9", "domain": "math", "difficulty": 2.0, "note": "z"},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(path: Path, **kwargs: Any) -> LoadResult:
    return load_examples(DataConfig(source=str(path), **kwargs))


@pytest.mark.parametrize(
    ("name", "writer"),
    [("d.jsonl", write_jsonl), ("d.json", write_jsonl), ("d.csv", write_csv), ("d.parquet", write_parquet)],
)
def test_each_format_loads(tmp_path: Path, name: str, writer: Any) -> None:
    result = load(writer(tmp_path / name, ROWS))
    assert result.skipped == []
    assert [e.id for e in result.examples] == ["a", "b", "c"]
    first = result.examples[0]
    assert (first.prompt, first.reference, first.domain, first.difficulty) == (
        "What is 2+2?",
        "4",
        "math",
        0.5,
    )
    assert result.examples[1].difficulty == 1.0
    assert first.metadata == {"note": "x"}


def test_defaults_numbers_mapping_and_cap(tmp_path: Path) -> None:
    rows = [{"q": "one?", "a": 1}, {"q": "half?", "a": 0.5, "reasoning": "r"}, {"q": "three?", "a": "3"}]
    path = write_jsonl(tmp_path / "nums.jsonl", rows)
    examples = load(path, prompt_field="q", reference_field="a").examples
    assert [e.reference for e in examples] == ["1", "0.5", "3"]
    assert [e.id for e in examples] == ["nums:1", "nums:2", "nums:3"]
    assert examples[0].domain is None and examples[0].difficulty is None
    assert examples[1].metadata == {"reasoning": "r"}
    assert len(load(path, prompt_field="q", reference_field="a", size=2).examples) == 2


def test_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text(
        '{"prompt": "p", "reference": "r"}\n\n{"prompt": "q", "reference": "s"}\n', encoding="utf-8"
    )
    assert [e.id for e in load(path).examples] == ["gaps:1", "gaps:3"]


def test_empty_reference_allowed_only_when_configured(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty_ref.jsonl", [{"prompt": "p", "reference": ""}])
    with pytest.raises(DataError, match=r"empty_ref\.jsonl, row 1, field 'reference': is empty"):
        load(path)
    assert load(path, allow_empty_reference=True).examples[0].reference == ""


GOOD_LINE = b'{"prompt": "p", "reference": "r"}\n'
GARBAGE = bytes(range(256)) * 4
Maker = Callable[[Path], Path]


def case(make: Maker, row: int | None, field_name: str | None, words: str, **extra: Any) -> Any:
    """A malformed input: its maker, the row and field the error must name, words in the problem, config."""
    return (make, row, field_name, words, extra)


def bad_row(row: dict[str, Any], name: str = "bad.jsonl") -> Maker:
    return lambda t: write_jsonl(t / name, [ROWS[0], row, ROWS[2]])


def raw(name: str, data: bytes) -> Maker:
    def make(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return make


MALFORMED = {
    "jsonl-invalid-utf8": case(
        raw("enc.jsonl", GOOD_LINE + b'{"prompt": "caf\xe9", "reference": "r"}\n'), 2, None, "byte offset 49"
    ),
    "csv-invalid-utf8": case(
        raw("enc.csv", b"prompt,reference\np,r\ncaf\xe9,r\n"), 2, "prompt", "invalid UTF-8"
    ),
    "truncated-jsonl": case(
        raw("cut.jsonl", GOOD_LINE * 2 + b'{"prompt": "p", "refer'), 3, None, "invalid JSON"
    ),
    "not-an-object": case(raw("arr.jsonl", GOOD_LINE + b"[1, 2]\n"), 2, None, "got list"),
    "missing-reference": case(bad_row({"prompt": "p"}), 2, "reference", "missing"),
    "missing-prompt": case(bad_row({"reference": "r"}), 2, "prompt", "missing"),
    "empty-prompt": case(bad_row({"prompt": "  \n", "reference": "r"}), 2, "prompt", "is empty"),
    "prompt-wrong-type": case(bad_row({"prompt": 5, "reference": "r"}), 2, "prompt", "got int"),
    "reference-wrong-type": case(bad_row({"prompt": "p", "reference": [1]}), 2, "reference", "got list"),
    "reference-bool": case(bad_row({"prompt": "p", "reference": True}), 2, "reference", "got bool"),
    "difficulty-text": case(bad_row({**ROWS[1], "difficulty": "hard"}), 2, "difficulty", "must be a number"),
    "domain-wrong-type": case(bad_row({**ROWS[1], "domain": {"a": 1}}), 2, "domain", "got dict"),
    "duplicate-id": case(bad_row({**ROWS[1], "id": "c"}, "dup.jsonl"), 3, "id", "first used at row 2"),
    "prompt-too-long": case(
        bad_row({**ROWS[1], "prompt": "x" * 50}), 2, "prompt", "50 char", max_prompt_chars=20
    ),
    "csv-value-count": case(raw("short.csv", b"prompt,reference,x\np,r,e\np,r\n"), 2, None, "has 2 values"),
    "csv-missing-column": case(
        raw("nocol.csv", b"prompt,answer\np,r\n"), None, "reference", "no such column"
    ),
    "csv-duplicate-column": case(
        raw("twice.csv", b"prompt,reference,prompt\n"), None, "prompt", "more than once"
    ),
    "parquet-wrong-type": case(
        lambda t: write_parquet(t / "typed.parquet", [{"prompt": "p", "reference": [1]}]),
        1,
        "reference",
        "got list",
    ),
    "garbage-jsonl": case(raw("garbage.jsonl", GARBAGE), None, None, "NUL bytes"),
    "garbage-csv": case(raw("garbage.csv", GARBAGE), None, None, "NUL bytes"),
    "garbage-parquet": case(raw("garbage.parquet", GARBAGE), None, None, "not a readable Parquet file"),
    "empty-jsonl": case(raw("empty.jsonl", b""), None, None, "no examples"),
    "blank-lines-only": case(raw("blank.jsonl", b"\n  \n"), None, None, "no examples"),
    "empty-csv": case(raw("empty.csv", b""), None, None, "no examples"),
    "header-only-csv": case(raw("header.csv", b"prompt,reference\n"), None, None, "no examples"),
    "missing-file": case(lambda t: t / "absent.jsonl", None, None, "file not found"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_data_names_file_row_and_field(tmp_path: Path, name: str) -> None:
    make, row, field_name, words, extra = MALFORMED[name]
    path = make(tmp_path)
    with pytest.raises(DataError) as caught:
        load(path, **extra)
    message = str(caught.value)
    assert path.name in message
    assert words in message
    assert caught.value.row == row
    assert caught.value.field == field_name
    if row is not None:
        assert f"row {row}" in message
    if field_name is not None:
        assert f"field '{field_name}'" in message


def test_unknown_extension_fails_in_config(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"data\.xlsx': unsupported file extension '\.xlsx'"):
        DataConfig(source=str(tmp_path / "data.xlsx"))


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"source": "x.jsonl", "colour": 1}, "Extra inputs are not permitted"),
        ({"source": " "}, "source is empty"),
        ({"source": "task:"}, "names no task"),
        ({"source": "x.jsonl", "task_args": {"a": 1}}, "only apply to task"),
        ({"source": "task:chain_sum", "task_args": {"seed": 1}}, "must not set seed"),
        ({"source": "x.csv", "prompt_field": "q", "reference_field": "q"}, "column 'q' is mapped"),
        ({"source": "x.csv", "size": 0}, "greater than or equal to 1"),
    ],
)
def test_config_validation(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        DataConfig(**settings)


def test_skip_mode_skips_and_counts(tmp_path: Path) -> None:
    rows = [
        ROWS[0],
        {"prompt": "p"},
        ROWS[1],
        {"prompt": "", "reference": "r"},
        ROWS[2],
        {**ROWS[2], "note": "dup"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with path.open("ab") as f:
        f.write(b'{"prompt": "cut')
    result = load(path, on_error="skip")
    assert [e.id for e in result.examples] == ["a", "b", "c"]
    assert [(e.row, e.field) for e in result.skipped] == [
        (2, "reference"),
        (4, "prompt"),
        (6, "id"),
        (7, None),
    ]


def test_skip_mode_with_nothing_left_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "allbad.jsonl", [{"prompt": "p"}, {"prompt": "q"}])
    with pytest.raises(DataError, match=r"allbad\.jsonl: no examples \(all 2 rows were skipped"):
        load(path, on_error="skip")


def test_skip_mode_still_raises_on_file_level_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load(tmp_path / "nope.csv", on_error="skip")


CHAIN = {"min_terms": 2, "max_terms": 3, "max_digits": 2}


def task(name: str = "chain_sum", **kwargs: Any) -> list[Example]:
    return load_examples(DataConfig(source=f"task:{name}", **kwargs)).examples


def test_task_is_deterministic_given_seed() -> None:
    first = task(size=20, seed=7, task_args=CHAIN)
    assert first == task(size=20, seed=7, task_args=CHAIN)
    assert [e.prompt for e in first] != [e.prompt for e in task(size=20, seed=8, task_args=CHAIN)]
    assert first[3].id == "chain_sum:7:3"
    assert first[0].domain == "chain_sum" and first[0].difficulty is None
    assert first[0].metadata["task"] == "chain_sum"
    assert first[0].reference == first[0].metadata["entry"]["answer"]
    assert len(task()) == 100


def test_task_prompt_length_limit_applies() -> None:
    with pytest.raises(DataError, match=r"task:chain_sum, row 1, field 'question'"):
        task(size=3, max_prompt_chars=10)
    with pytest.raises(DataError, match="all 3 rows were skipped"):
        task(size=3, max_prompt_chars=10, on_error="skip")


def test_unknown_task_says_how_to_list_names() -> None:
    with pytest.raises(
        DataError, match=r"unknown reasoning-gym task 'chain_summ'; did you mean chain_sum.*DATASETS"
    ):
        task("chain_summ")


@pytest.mark.parametrize(
    ("args", "words"),
    [({"bogus": 1}, "bogus"), ({"min_terms": 5, "max_terms": 2}, "max_terms must be >= min_terms")],
)
def test_bad_task_args_carry_the_task_message(args: dict[str, Any], words: str) -> None:
    with pytest.raises(DataError, match=words) as caught:
        task(size=2, task_args=args)
    assert caught.value.field == "task_args"


def _final_value(reasoning: str) -> str:
    return reasoning.splitlines()[-1].split("=")[-1].replace("(rounded down)", "").strip()


def test_arithmetic_steps() -> None:
    assert arithmetic_steps("12 + 7 - 3") == (["12 + 7 = 19", "19 - 3 = 16"], 16)
    assert arithmetic_steps("12") == ([], 12)
    assert arithmetic_steps("5 - -3") == (["5 - -3 = 8"], 8)
    assert arithmetic_steps("2+3*-4") == (["3 * -4 = -12", "2 + -12 = -10"], -10)
    assert arithmetic_steps("-( 1 + 2 ) * 7 / 2") == (
        ["1 + 2 = 3", "-(3) = -3", "-3 * 7 = -21", "-21 / 2 = -11 (rounded down)"],
        -11,
    )
    for bad in ["1 +", "(1 + 2", "1 ^ 2", "4 / 0"]:
        with pytest.raises(ValueError):
            arithmetic_steps(bad)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("chain_sum", {}),
        ("chain_sum", {"min_terms": 1, "max_terms": 4, "allow_negation": True}),
        ("basic_arithmetic", {}),
        ("basic_arithmetic", {"whitespace": "no_space"}),
    ],
)
def test_worked_solution_ends_at_the_reference(name: str, args: dict[str, Any]) -> None:
    examples = task(name, size=50, seed=11, task_args=args)
    writer = WORKED_SOLUTIONS.get(name)
    for example in examples:
        assert _final_value(writer(example)) == example.reference


def test_single_term_solution() -> None:
    example = Example("State: 12 =", "12", metadata={"task": "chain_sum", "expression": "12"})
    assert WORKED_SOLUTIONS.get("chain_sum")(example) == "12"


def test_worked_solution_refuses_a_wrong_reference() -> None:
    example = Example("1 + 1 =", "3", id="w", metadata={"task": "chain_sum", "expression": "1 + 1"})
    with pytest.raises(ValueError, match="worked solution gives 2, reference is 3"):
        WORKED_SOLUTIONS.get("chain_sum")(example)


def test_sft_pairs_parse_back_strictly() -> None:
    tags = TagFormat()
    examples = task(size=20, seed=3, task_args=CHAIN)
    examples.append(Example("Why?", "Because.", id="r", metadata={"reasoning": "  It is so.  "}))
    pairs = sft_pairs(examples, tags, "task:chain_sum")
    assert [e for e, _ in pairs] == examples
    for example, completion in pairs:
        parsed = tags.parse(completion)
        assert parsed.strict and parsed.answer == example.reference
    assert tags.parse(pairs[-1][1]).reasoning == "It is so."
    custom = TagFormat(think="reasoning", answer="final")
    assert custom.parse(sft_pairs(examples[:1], custom, "task:chain_sum")[0][1]).strict


def test_sft_pairs_without_reasoning_or_writer_explains() -> None:
    match = r"^task:leg_counting: SFT needs .*'reasoning' column.*known: basic_arithmetic, chain_sum.*leg_counting"
    with pytest.raises(MissingSolutions, match=match) as caught:
        example = Example("p", "r", id="x", metadata={"task": "leg_counting"})
        sft_pairs([example], TagFormat(), "task:leg_counting")
    assert "\n" not in str(caught.value)


def test_sft_pairs_name_the_row_without_a_solution() -> None:
    rows = [
        Example("a", "1", id="a", metadata={"reasoning": "so 1"}, row=1),
        Example("b", "2", id="b", metadata={"reasoning": " "}, row=2),
    ]
    with pytest.raises(DataError, match=r"^d.jsonl, row 2, field 'reasoning': missing or empty") as caught:
        sft_pairs(rows, TagFormat(), "d.jsonl")
    assert not isinstance(caught.value, MissingSolutions)
    wrong = Example("1 + 1 =", "3", id="w", metadata={"task": "chain_sum", "expression": "1 + 1"}, row=4)
    with pytest.raises(DataError, match=r"^t, row 4: no worked solution: .*gives 2, reference is 3"):
        sft_pairs([wrong], TagFormat(), "t")


def test_keep_usable_raises_or_skips_by_on_error() -> None:
    examples = [Example("p", str(i), id=str(i), row=i + 1) for i in range(3)]

    def odd(example: Example) -> str | None:
        return "needs an even reference" if int(example.reference) % 2 else None

    with pytest.raises(DataError, match=r"^f.jsonl, row 2: needs an even reference$"):
        keep_usable(examples, DataConfig(source="f.jsonl"), odd)
    kept, skipped = keep_usable(examples, DataConfig(source="f.jsonl", on_error="skip"), odd)
    assert [e.id for e in kept] == ["0", "2"] and [e.row for e in skipped] == [2]
    with pytest.raises(DataError, match="no usable examples"):
        keep_usable(examples[1:2], DataConfig(source="f.jsonl", on_error="skip"), odd)


TASK_RECIPE = """
data: {source: task:chain_sum, size: 2000, seed: 3, task_args: {min_terms: 2}, on_error: skip}
eval: {data: {source: task:chain_sum, size: 48, task_args: {min_terms: 2}}, max_new_tokens: 8}
sft: {steps: 4}
rl: {steps: 1}
"""


def recipe_with(tmp_path: Path, text: str, *sets: str) -> Any:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return load_recipe(path, list(sets))


def test_recipe_settings_for_a_replaced_task_source_are_dropped_with_a_note(tmp_path: Path, capsys) -> None:
    recipe = recipe_with(tmp_path, TASK_RECIPE, "data.source=mine.jsonl")
    assert recipe.data.source == "mine.jsonl" and recipe.data.size is None and recipe.data.task_args == {}
    assert recipe.data.on_error == "skip"  # applies to files too: kept
    assert recipe.eval.data is None and recipe.eval.max_new_tokens == 8
    assert recipe.sft.steps == 4 and recipe.sft.without_solutions == "skip"
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 2
    assert "data.task_args, data.seed, data.size" in notes[0] and "task:chain_sum" in notes[0]
    assert "eval.data" in notes[1] and "eval.data.source=FILE" in notes[1]


def test_settings_given_with_set_still_conflict(tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="task_args only apply to task"):
        recipe_with(tmp_path, TASK_RECIPE, "data.source=mine.jsonl", "data.task_args={min_terms: 3}")
    recipe = recipe_with(tmp_path, TASK_RECIPE, "data.source=mine.jsonl", "data.size=5", "sft.steps=2")
    assert recipe.data.size == 5 and recipe.sft.without_solutions == "error"
    recipe = recipe_with(tmp_path, TASK_RECIPE, "data.source=mine.jsonl", "eval.data.size=4")
    assert recipe.eval.data is not None and recipe.eval.data.source == "task:chain_sum"


def test_no_source_override_changes_nothing(tmp_path: Path, capsys) -> None:
    recipe = recipe_with(tmp_path, TASK_RECIPE, "data.size=10")
    assert recipe.data.task_args == {"min_terms": 2} and recipe.eval.data is not None
    assert recipe.sft.without_solutions == "error"
    same_kind = recipe_with(tmp_path, TASK_RECIPE, "data.source=task:basic_arithmetic")
    assert same_kind.data.task_args == {"min_terms": 2} and same_kind.eval.data is None
    assert "task_args" not in capsys.readouterr().out
    file_recipe = "data: {source: a.csv, size: 9, prompt_field: q}\nrl: {steps: 1}\n"
    to_task = recipe_with(tmp_path, file_recipe, "data.source=task:chain_sum")
    assert to_task.data.size is None and to_task.data.prompt_field == "prompt"
