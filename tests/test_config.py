import re

import pytest

from incentive.config import ConfigError, load_recipe
from incentive.registry import LISTED, Registry

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


def test_invalid_value_is_one_line_naming_key_value_and_origin(tmp_path):
    path = write(tmp_path, BASE + "optim: {lr: -1}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path, ["generation.max_new_tokens=many"])
    assert str(err.value) == (
        f"2 problems: --set generation.max_new_tokens=many: generation.max_new_tokens = 'many': should be a "
        f"valid integer, unable to parse string as an integer | {path}: optim.lr = -1: should be greater than 0"
    )


def test_unknown_key_suggests_the_closest_field_or_lists_the_section(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, BASE + "eval: {bach_size: 4}\n"))
    assert str(err.value).endswith("eval.bach_size: unknown key; did you mean 'batch_size'?")
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, BASE), ["optim.learning_rate=0.1"])
    assert str(err.value) == (
        "--set optim.learning_rate=0.1: optim.learning_rate: unknown key; "
        "valid keys: betas, lr, max_grad_norm, schedule, warmup_steps, weight_decay"
    )


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("rewards: [{name: verifer}]", "rewards[0].name: unknown reward 'verifer'; did you mean"),
        ("advantage: {name: dr-grpo}", "advantage.name: unknown advantage estimator 'dr-grpo'; did you mean"),
        ("template: {name: think_answer}", "template.name: unknown template 'think_answer'; did you mean"),
        ("hooks: [{name: laser-monitor}]", "hooks[0].name: unknown hook 'laser-monitor'; did you mean"),
        ("model: {backend: refrence}", "model.backend: unknown logprob backend 'refrence'; did you mean"),
    ],
)
def test_registered_names_are_checked_at_load_time(tmp_path, section, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(write(tmp_path, BASE + section + "\n"))


def test_registry_suggests_one_close_name_and_lists_nothing_huge():
    registry = Registry("reward")
    for name in ["format", "tag_format", *(f"part_{i}" for i in range(20))]:
        registry.register(name)(object)
    with pytest.raises(KeyError) as err:
        registry.get("fromat")
    assert str(err.value) == "unknown reward 'fromat'; did you mean 'format'?"
    with pytest.raises(KeyError) as err:
        registry.get("zzz")
    assert str(err.value).endswith(", ... (22 in all)") and str(err.value).count(",") == LISTED


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: [unclosed\n", "not valid YAML: expected ',' or ']', but got '<stream end>' (line 2"),
        ("data: {a: 1}\n\tbad: tab\n", "not valid YAML: found character '\\t' that cannot start any token"),
    ],
)
def test_yaml_syntax_error_is_one_line_with_its_place(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)


def test_override_key_path_must_have_no_empty_part(tmp_path):
    with pytest.raises(ConfigError, match=r"'rl\.\.steps' is not a key path"):
        load_recipe(write(tmp_path, BASE), ["rl..steps=1"])
