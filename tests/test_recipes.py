"""Every bundled recipe runs end to end, a step or two, on the tiny model; the CLI wires it all."""

import json
from pathlib import Path

import pytest
import yaml

from incentive.cli import RECIPES_DIR, main

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def tiny_overrides(path: Path) -> list[str]:
    tree = yaml.safe_load(path.read_text())
    sets = [
        "model.name=tiny-random",
        "data.size=8",
        "rl.steps=2",
        "generation.max_new_tokens=8",
        "generation.prompts_per_step=2",
        "generation.num_generations=2",
    ]
    if tree.get("sft", {}).get("steps"):
        sets += ["sft.steps=1", "sft.batch_size=2"]
    if tree.get("reward_model", {}).get("steps"):
        sets += ["reward_model.steps=2", "reward_model.batch_size=2", "reward_model.eval_every=0"]
    if tree.get("eval", {}).get("data"):
        sets += ["eval.data.size=2", "eval.max_new_tokens=4"]
    return [s for item in sets for s in ("--set", item)]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_on_tiny_model(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(RECIPES_DIR.parent)
    run_dir = tmp_path / recipe.stem
    assert main(["train", str(recipe), "--run-dir", str(run_dir), *tiny_overrides(recipe)]) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum('"stage": "rl"' in line for line in lines) == 2
    assert (run_dir / "checkpoints" / "latest").exists()
    if yaml.safe_load(recipe.read_text()).get("reward_model", {}).get("steps"):
        assert sum('"stage": "reward_model"' in line for line in lines) == 2
        assert (run_dir / "reward_model" / "config.json").exists()


PAIRS = [
    ("What is 2 + 3?", "5"),
    ("Capital of France?", "Paris"),
    ("What is 9 - 3?", "6"),
    ("Opposite of up?", "down"),
]
TINY = [
    "model.name=tiny-random",
    "rl.steps=1",
    "generation.max_new_tokens=8",
    "generation.prompts_per_step=2",
    "generation.num_generations=2",
]
NEEDS = {"gui-g1": "needs the reference to be a box [x1, y1, x2, y2]"}
"""Bundled recipes whose rewards cannot score plain prompt/reference data, and what their refusal says they need."""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train(recipe: Path, run_dir: Path, *sets: str) -> int:
    return main(["train", str(recipe), "--run-dir", str(run_dir), *(x for s in sets for x in ("--set", s))])


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_on_your_own_prompt_reference_pairs(recipe, tmp_path, capsys, monkeypatch):
    """README's "your own data" command for every bundled recipe: only data.source changes (and the model and
    sizes, for speed). What the recipe wrote for its own data is dropped, each with a note."""
    monkeypatch.chdir(RECIPES_DIR.parent)
    pairs = write_jsonl(tmp_path / "my_pairs.jsonl", [{"prompt": p, "reference": r} for p, r in PAIRS])
    run_dir = tmp_path / "run"
    tree = yaml.safe_load(recipe.read_text())
    own_stage = ["reward_model.steps=1"] if tree.get("reward_model", {}).get("steps") else []
    code = train(recipe, run_dir, f"data.source={pairs}", *TINY, *own_stage)
    out, err = capsys.readouterr()
    if recipe.stem in NEEDS:
        assert code == 2
        assert len(error_lines(err)) == 1 and NEEDS[recipe.stem] in err, err
        assert not run_dir.exists()
        return
    assert code == 0, err
    if tree["data"]["source"].startswith("task:"):
        assert "dropped the recipe's data.task_args" in out
    if tree.get("eval", {}).get("data"):
        assert "dropped the recipe's eval.data" in out
    if tree.get("sft", {}).get("steps"):
        assert f"skipped the recipe's {tree['sft']['steps']} SFT steps" in out
    stages = [json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["reward_model"] * len(own_stage) + ["rl"]  # a reward model trains on data of its own


def test_box_recipe_runs_on_your_own_boxes(tmp_path, capsys):
    rows = [
        {"prompt": f"Screen 100x80: {name} at {box}. Where is {name}?", "reference": box}
        for name, box in [("button OK", "[10, 10, 30, 20]"), ("link Help", "[50, 5, 70, 15]")]
    ]
    boxes = write_jsonl(tmp_path / "boxes.jsonl", [{**row, "width": 100, "height": 80} for row in rows])
    assert train(RECIPES_DIR / "gui-g1.yaml", tmp_path / "run", f"data.source={boxes}", *TINY) == 0
    no_size = write_jsonl(tmp_path / "no_size.jsonl", rows)
    assert train(RECIPES_DIR / "gui-g1.yaml", tmp_path / "run2", f"data.source={no_size}", *TINY) == 2
    assert "no_size.jsonl, row 1: reward 'box_closeness' needs the screen size" in capsys.readouterr().err


def test_sft_on_data_without_solutions_refuses_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("incentive.run.build_policy", no_model)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "reference": r} for p, r in PAIRS])
    recipe = RECIPES_DIR / "grpo-chain-sum.yaml"
    assert train(recipe, tmp_path / "run", f"data.source={pairs}", "sft.steps=2", *TINY) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {pairs}: sft.steps is 2, but SFT needs worked solutions")
    assert "'reasoning' column" in line and "sft.steps=0" in line
    assert not (tmp_path / "run").exists()


def test_recipes_command_lists_descriptions(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for path in RECIPES:
        assert path.stem in out
    assert "NOVER" in out
    # the other commands' recipes, named with their command
    assert "hcrmp (incentive control)" in out and "geter (incentive geter)" in out


def test_train_with_unknown_key_exits_2_with_message(tmp_path, capsys):
    code = main(
        ["train", str(RECIPES_DIR / "demo.yaml"), "--set", "rl.bogus=1", "--run-dir", str(tmp_path / "x")]
    )
    assert code == 2
    assert "bogus" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_eval_on_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(RECIPES_DIR.parent)
    recipe = RECIPES_DIR / "grpo-chain-sum.yaml"
    run_dir = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run_dir), *tiny_overrides(recipe)]) == 0
    policy = run_dir / "checkpoints" / "rl-000002" / "policy"
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--model",
            str(policy),
            "--data",
            "task:chain_sum",
            "--size",
            "3",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert '"accuracy"' in capsys.readouterr().out
    assert out.exists()
