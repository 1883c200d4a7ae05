"""Every bundled recipe runs end to end, a step or two, on the tiny model; the CLI wires it all."""

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


def test_recipes_command_lists_descriptions(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for path in RECIPES:
        assert path.stem in out
    assert "NOVER" in out


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
