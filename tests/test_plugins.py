"""User plugins: a recipe's ``imports`` registers a reward and an advantage estimator from a file (or a module) with
the package's own decorators, and training uses them; one reward listed twice under two ids; a bad import is one
``error:`` line; a resumed run imports its plugins again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from incentive.advantages import ADVANTAGES
from incentive.cli import main
from incentive.config import Recipe, load_recipe
from incentive.rewards import REWARDS
from incentive.templates import TEMPLATES

PLUGIN = """
from incentive.advantages import ADVANTAGES, AdvantageEstimator
from incentive.rewards import REWARDS, Reward, RewardResult


@REWARDS.register("plugin_length")
class LengthReward(Reward):
    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, batch, ctx):
        return RewardResult([self.scale * len(c.text) for c in batch])


@ADVANTAGES.register("plugin_centred")
class Centred(AdvantageEstimator):
    groups = 0

    def group(self, scores):
        Centred.groups += 1
        return scores - scores.mean()
"""

RECIPE = """
imports: [{plugin}]
model: {{name: tiny-random}}
data: {{source: task:chain_sum, size: 4}}
generation: {{num_generations: 2, prompts_per_step: 1, max_new_tokens: 4}}
rewards: {rewards}
advantage: {{name: plugin_centred}}
rl: {{steps: {steps}}}
"""


@pytest.fixture(autouse=True)
def registries(monkeypatch):
    """Each test's plugins register into copies of the registries, so every test can use the same names."""
    for registry in (REWARDS, ADVANTAGES, TEMPLATES):
        monkeypatch.setattr(registry, "_items", dict(registry._items))


def write_recipe(
    folder: Path, rewards: str = "[{name: plugin_length}]", steps: int = 2, plugin: str = "plugins/parts.py"
) -> Path:
    """A recipe in ``folder`` importing ``plugin`` (the file written to folder/plugins/parts.py)."""
    (folder / "plugins").mkdir(exist_ok=True)
    (folder / "plugins" / "parts.py").write_text(PLUGIN)
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(plugin=plugin, rewards=rewards, steps=steps))
    return path


def rl_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == "rl"]


def error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_reward_and_estimator_from_a_file_train(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", str(write_recipe(tmp_path)), "--run-dir", str(run_dir)]) == 0
    records = rl_records(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["reward/plugin_length/mean"] > 0 for r in records)
    assert ADVANTAGES.get("plugin_centred").groups >= 2
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["imports"] == [str((tmp_path / "plugins" / "parts.py").resolve())]


def test_one_reward_listed_twice_under_two_ids(tmp_path: Path) -> None:
    rewards = "[{name: plugin_length, id: chars}, {name: plugin_length, id: double, args: {scale: 2}}]"
    run_dir = tmp_path / "run"
    assert main(["train", str(write_recipe(tmp_path, rewards, steps=1)), "--run-dir", str(run_dir)]) == 0
    (record,) = rl_records(run_dir)
    assert record["reward/double/mean"] == 2 * record["reward/chars/mean"] > 0
    assert all(set(sample["components"]) == {"chars", "double"} for sample in record["samples"])
    assert main(["report", str(run_dir)]) == 0
    html = (run_dir / "report" / "report.html").read_text()
    assert "chars (plugin_length), double (plugin_length)" in html  # the runs table's rewards


@pytest.mark.parametrize(
    ("rewards", "words"),
    [
        (
            "[{name: plugin_length}, {name: plugin_length, args: {scale: 2}}]",
            "rewards[0] and rewards[1] are both reward 'plugin_length'; to list a reward twice, give each entry "
            "its own id",
        ),
        ("[{name: plugin_length, id: format}, {name: format}]", "are both logged as 'format'; give them different"),
        ("[{name: plugin_length, id: a/b}]", "rewards[0].id: 'a/b': use letters, digits"),
    ],
    ids=["no-ids", "id-is-another-name", "slash"],
)
def test_rewards_that_would_share_a_key_are_refused(rewards: str, words: str, tmp_path: Path, capsys) -> None:
    assert main(["train", str(write_recipe(tmp_path, rewards)), "--run-dir", str(tmp_path / "run")]) == 2
    assert words in error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("plugin", "source", "words"),
    [
        ("missing.py", None, "imports[0]: cannot import 'missing.py': no file {folder}/missing.py"),
        ("no_such_module_here", None, "imports[0]: cannot import 'no_such_module_here': no module named"),
        (
            "broken.py",
            "x = 1\nraise RuntimeError('plugin is broken')\n",
            "cannot import 'broken.py': RuntimeError: plugin is broken (at {folder}/broken.py, line 2)",
        ),
        ("broken.py", "def f(:\n", "cannot import 'broken.py': SyntaxError: "),
        (
            "broken.py",
            "import no_such_dependency\n",
            "ModuleNotFoundError: No module named 'no_such_dependency' (at {folder}/broken.py, line 1)",
        ),
        (
            "broken.py",
            "from incentive.rewards import REWARDS, Reward\n\n\n@REWARDS.register('format')\nclass Mine(Reward):\n"
            "    pass\n",
            "ValueError: reward 'format' is registered twice (by incentive.rewards.format.FormatReward and by ",
        ),
    ],
    ids=["missing-file", "missing-module", "raises", "syntax", "missing-dependency", "taken-name"],
)
def test_a_failed_import_is_one_error_line(
    plugin: str, source: str | None, words: str, tmp_path: Path, capsys
) -> None:
    recipe = write_recipe(tmp_path, plugin=plugin)
    if source is not None:
        (tmp_path / plugin).write_text(source)
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {recipe}: imports[0]: ") and "problems" not in line
    assert words.format(folder=tmp_path.resolve()) in line
    assert not (tmp_path / "run").exists()


def test_dotted_module_name(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "site" / "incentive_test_plugins"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "parts.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("incentive_test_plugins", "incentive_test_plugins.parts"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        recipe = load_recipe(write_recipe(tmp_path, plugin="incentive_test_plugins.parts"))
        assert recipe.imports == ["incentive_test_plugins.parts"] and recipe.rewards[0].key == "plugin_length"
    finally:
        for name in ("incentive_test_plugins", "incentive_test_plugins.parts"):
            sys.modules.pop(name, None)


def test_a_recipe_built_in_python_imports_from_the_current_folder(tmp_path: Path, monkeypatch) -> None:
    write_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    tree = {"imports": ["plugins/parts.py"], "data": {"source": "task:chain_sum"}}
    recipe = Recipe.model_validate({**tree, "rewards": [{"name": "plugin_length", "id": "chars"}]})
    assert recipe.imports == [str(tmp_path.resolve() / "plugins" / "parts.py")]
    assert [r.key for r in recipe.rewards] == ["chars"]


def test_resume_imports_the_plugins_again(tmp_path: Path, monkeypatch) -> None:
    recipe, run_dir = write_recipe(tmp_path, steps=1), tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run_dir)]) == 0
    plugin = str((tmp_path / "plugins" / "parts.py").resolve())
    for name in [n for n, m in sys.modules.items() if getattr(m, "__file__", None) == plugin]:
        monkeypatch.delitem(sys.modules, name)  # as in a new process: the plugin never imported
    monkeypatch.delitem(REWARDS._items, "plugin_length")
    monkeypatch.delitem(ADVANTAGES._items, "plugin_centred")
    with pytest.raises(ValidationError, match="unknown reward 'plugin_length'"):
        Recipe.model_validate({"data": {"source": "task:chain_sum"}, "rewards": [{"name": "plugin_length"}]})
    config = run_dir / "config.yaml"  # the run's own record of its recipe: the plugin by its absolute path
    assert main(["train", str(config), "--run-dir", str(run_dir), "--resume", "--set", "rl.steps=2"]) == 0
    assert [r["step"] for r in rl_records(run_dir)] == [1, 2]
    assert "plugin_length" in REWARDS


def test_eval_imports_a_template(tmp_path: Path, capsys) -> None:
    plugin = tmp_path / "template.py"
    plugin.write_text(
        "from incentive.templates import TEMPLATES, Template\n\n\n"
        "@TEMPLATES.register('plugin-terse')\n"
        "class Terse(Template):\n"
        "    def user_message(self, example):\n"
        "        return f'Solve: {example.prompt}'\n"
    )
    args = ["eval", "--model", "tiny-random", "--data", "task:chain_sum", "--size", "1", "--max-new-tokens", "2"]
    assert main([*args, "--import", str(plugin), "--template", "plugin-terse", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["n"] == 1
    capsys.readouterr()
    assert main([*args, "--import", str(tmp_path / "missing.py")]) == 2
    missing = tmp_path / "missing.py"
    expected = f"error: --import: cannot import '{missing}': no file {missing.resolve()}"
    assert error_line(capsys.readouterr().err) == expected
