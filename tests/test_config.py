import pytest

from incentive.config import ConfigError, load_recipe

BASE = """
data: {source: task:chain_sum, size: 10}
rl: {steps: 1}
"""


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.model.name == "embedded"
    assert recipe.advantage.name == "grpo"
    assert [r.name for r in recipe.rewards] == ["format", "verifier"]


def test_unknown_key_fails_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="learning_rate"):
        load_recipe(write(tmp_path, BASE + "optim: {learning_rate: 0.1}\n"))
    with pytest.raises(ConfigError, match="bogus"):
        load_recipe(write(tmp_path, BASE + "bogus: 1\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    recipe = load_recipe(
        write(tmp_path, BASE), ["rl.steps=7", "optim.lr=3e-6", "model.lora.r=8", "loss.kl_beta=0.1"]
    )
    assert recipe.rl.steps == 7
    assert recipe.optim.lr == pytest.approx(3e-6)
    assert recipe.model.lora is not None and recipe.model.lora.r == 8
    with pytest.raises(ConfigError, match="rl.steps|steps"):
        load_recipe(write(tmp_path, BASE), ["rl.steps=-1"])
    with pytest.raises(ConfigError, match="form"):
        load_recipe(write(tmp_path, BASE), ["rl.steps"])
    with pytest.raises(ConfigError, match="nope"):
        load_recipe(write(tmp_path, BASE), ["rl.nope=1"])


def test_proxy_reference_needs_proxy(tmp_path):
    with pytest.raises(ConfigError, match="proxy"):
        load_recipe(write(tmp_path, BASE + "loss: {kl_reference: proxy, kl_beta: 0.1}\n"))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
