"""docs/architecture.md's worked example runs as written: its three plugin files (a reward, an advantage
estimator, an environment) and its recipe are taken from the page, written to a folder and trained for one RL
step on the tiny model, so the page cannot go stale silently. A block of the example is a fenced block whose
first line is a comment naming its file (``# last_answer.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from incentive.advantages import ADVANTAGES
from incentive.config import load_recipe
from incentive.rewards import REWARDS
from incentive.rollout import ENVIRONMENTS
from incentive.run import Run

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
BLOCK = re.compile(
    r"^```(?:python|yaml)\n# (?P<name>[\w.-]+\.(?:py|yaml))\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE
)
SMALL = [
    "model.name=tiny-random",
    "data.size=4",
    "generation.num_generations=2",
    "generation.prompts_per_step=2",
    "generation.max_new_tokens=12",
    "environment.max_turn_tokens=6",
    "sft.steps=0",
    "rl.steps=1",
    "rl.skip_zero_advantage=false",  # random weights earn no reward: run the update anyway
]
"""The page's recipe made small enough for the tiny model and one step."""


@pytest.fixture(autouse=True)
def registries(monkeypatch):
    """The page's plugins register into copies of the registries, leaving the real ones as they were."""
    for registry in (REWARDS, ADVANTAGES, ENVIRONMENTS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))


def example_files() -> dict[str, str]:
    """File name → text of each block of the page's worked example."""
    files: dict[str, str] = {}
    for match in BLOCK.finditer(DOC.read_text(encoding="utf-8")):
        assert match["name"] not in files, f"two blocks of {DOC.name} are named {match['name']}"
        files[match["name"]] = f"# {match['name']}\n{match['body']}"
    return files


def test_the_example_is_three_plugins_and_a_recipe_that_imports_them() -> None:
    files = example_files()
    plugins = sorted(name for name in files if name.endswith(".py"))
    assert len(plugins) == 3 and "recipe.yaml" in files and len(files) == 4, sorted(files)
    assert sorted(yaml.safe_load(files["recipe.yaml"])["imports"]) == plugins
    for name in plugins:
        lines = files[name].strip().splitlines()
        assert len(lines) <= 24, f"{name}: {len(lines)} lines; the page promises about a dozen"


def test_the_example_trains_an_rl_step(tmp_path: Path, monkeypatch) -> None:
    for name, text in example_files().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    recipe = load_recipe(tmp_path / "recipe.yaml", SMALL)
    assert recipe.environment is not None
    estimator = ADVANTAGES.get(recipe.advantage.name)
    original = estimator.estimate
    seen = []

    def estimate(self, batch):
        seen.append(batch)
        return original(self, batch)

    monkeypatch.setattr(estimator, "estimate", estimate)
    run = Run(recipe, tmp_path / "run")
    run.execute()
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    (record,) = [r for r in map(json.loads, lines) if r.get("stage") == "rl"]
    assert record["failed"] == 0, record["failures"]  # no plugin raised or returned garbage
    assert record["env/failed_share"] == 0.0
    assert record["env/turns_mean"] >= 1
    assert record["train/skipped"] == 0.0 and record["train/trained_sequences"] == 4
    for reward in recipe.rewards:
        assert f"reward/{reward.key}/mean" in record
    assert any(key.startswith(f"extra/{recipe.rewards[0].key}/") for key in record)
    (batch,) = seen
    assert batch.step_rewards is not None and len(batch.step_rewards) == len(batch) == 4
    samples = record["samples"]
    assert all(s["completion"] and set(s["components"]) == {r.key for r in recipe.rewards} for s in samples)
