"""Reward models: the Bradley–Terry and regression objectives by hand, the ``reward_model`` stage of ``incentive
train`` on the tiny model (it learns a synthetic preference and ranks pairs it never saw above chance), the saved
Hugging Face folder, resume, bad data, and the ``reward_model`` reward part in RL."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from incentive.cli import main
from incentive.config import ConfigError, RewardConfig, load_recipe
from incentive.data.example import Example
from incentive.models import load_tokenizer
from incentive.models.loading import tiny_dir
from incentive.rewards.base import RewardContext
from incentive.rewards.pipeline import RewardPipeline
from incentive.rewards.reward_model import RewardModel
from incentive.rollout.types import Completion, RolloutBatch
from incentive.run import Run
from incentive.templates import TagFormat
from incentive.training.reward_model import (
    RewardModelTrainer,
    bradley_terry_loss,
    pairwise_accuracy,
    regression_loss,
    split_held_out,
)

WORDS = ["apple", "river", "stone", "cloud", "lamp", "green", "seven", "music", "paper", "field"]
GOOD, BAD = "thanks", "sorry"
"""The synthetic preference: a response ending in GOOD beats one ending in BAD, whatever comes before."""


def synthetic_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """{prompt, chosen, rejected} rows: random words, the chosen response ending in GOOD and the rejected in BAD."""
    rng = random.Random(seed)

    def words() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))

    rows = []
    for _ in range(n):
        prompt = f"Tell me about the {rng.choice(WORDS)}."
        rows.append({"prompt": prompt, "chosen": f"{words()} {GOOD}", "rejected": f"{words()} {BAD}"})
    return rows


def synthetic_labels(n: int, seed: int) -> list[dict[str, object]]:
    """{prompt, completion, label} rows of the same rule: label 1 for a completion ending in GOOD, 0 for BAD."""
    rows: list[dict[str, object]] = []
    for pair in synthetic_pairs(n // 2, seed):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": 1.0})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": 0})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe_file(tmp_path: Path, reward_model: str, extra: str = "") -> Path:
    """A recipe of the reward-model stage alone on the tiny model (``data`` is what an RL stage would use)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model: {name: tiny-random}\n"
        "data: {source: task:chain_sum, size: 8}\n"
        "generation: {num_generations: 2, prompts_per_step: 2, max_new_tokens: 8}\n"
        f"reward_model: {reward_model}\n" + extra
    )
    return path


def train(recipe: Path, run_dir: Path, *sets: str) -> int:
    return main(["train", str(recipe), "--run-dir", str(run_dir), *(x for s in sets for x in ("--set", s))])


def records(run_dir: Path, stage: str = "reward_model") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == stage]


def batch_of(pairs: list[dict[str, str]]) -> RolloutBatch:
    """Each pair's chosen and rejected response as two completions of one group."""
    completions = []
    for group, pair in enumerate(pairs):
        example = Example(pair["prompt"], "", id=str(group))
        for text in (pair["chosen"], pair["rejected"]):
            completions.append(Completion(group, example, pair["prompt"], [1], [1], text))
    return RolloutBatch(completions)


def ranked_share(scores: list[float]) -> float:
    """Share of (chosen, rejected) score pairs, laid out as :func:`batch_of` lays them, with chosen above."""
    return sum(c > r for c, r in zip(scores[::2], scores[1::2], strict=True)) / (len(scores) // 2)


def test_bradley_terry_loss_and_gradient_by_hand():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.5, 1.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    # -log σ(1.5) = log(1 + e^-1.5) = 0.201413, -log σ(-1) = log(1 + e) = 1.313262
    assert float(loss.detach()) == pytest.approx((0.201413 + 1.313262) / 2, abs=1e-5)
    loss.backward()
    # d/d r_chosen = -σ(r_rejected - r_chosen) / n: gradient descent raises the chosen score, lowers the rejected
    assert chosen.grad.tolist() == pytest.approx([-0.182426 / 2, -0.731059 / 2], abs=1e-5)
    assert rejected.grad.tolist() == pytest.approx([0.182426 / 2, 0.731059 / 2], abs=1e-5)
    assert float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]))) == pytest.approx(math.log(2))


def test_regression_loss_and_pairwise_accuracy_by_hand():
    scores = torch.tensor([1.0, 0.0], requires_grad=True)
    loss = regression_loss(scores, torch.tensor([0.5, 1.0]))
    assert float(loss.detach()) == pytest.approx((0.25 + 1.0) / 2)
    loss.backward()
    assert scores.grad.tolist() == pytest.approx([0.5, -1.0])  # 2 (s - y) / n
    labels = torch.tensor([1.0, 0.0, 0.5, 0.5])
    assert pairwise_accuracy(torch.tensor([3.0, 1.0, 2.0, 2.5]), labels) == 1.0
    # pairs with different labels: (0,1) right, (0,2) right, (0,3) wrong, (2,1) right, (3,1) tie in score
    assert pairwise_accuracy(torch.tensor([2.0, 1.0, 1.5, 3.0]), labels) == pytest.approx(4 / 5)
    assert pairwise_accuracy(torch.tensor([2.0, 1.0, 1.5, 1.0]), labels) == pytest.approx(4.5 / 5)
    assert pairwise_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])) is None


def test_held_out_split_is_seeded_and_disjoint():
    items = list(range(20))
    train_a, held_a = split_held_out(items, 0.25, 3)
    assert (train_a, held_a) == split_held_out(items, 0.25, 3)
    assert len(held_a) == 5 and sorted(train_a + held_a) == items and held_a == sorted(held_a)
    assert split_held_out(items, 0.25, 4)[1] != held_a
    assert split_held_out(items, 0.0, 3) == (items, [])
    assert len(split_held_out(items[:3], 0.01, 3)[1]) == 1  # at least one where a share is asked for
    assert len(split_held_out(items[:2], 0.9, 3)[0]) == 1  # never all


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of the reward-model stage alone, 30 steps of Bradley–Terry on 80 synthetic pairs (20 held out)."""
    tmp_path = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(80, seed=0))
    stage = f"{{steps: 30, batch_size: 8, lr: 1.0e-3, eval_share: 0.25, eval_every: 10, data: {{source: {data}}}}}"
    assert train(recipe_file(tmp_path, stage), tmp_path / "run") == 0
    return tmp_path / "run"


def test_stage_learns_the_preference_and_logs_it(trained):
    logged = records(trained)
    assert [r["step"] for r in logged] == list(range(1, 31))
    evals = [r for r in logged if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(r["eval/n"] == 20 for r in evals)
    assert evals[-1]["eval/accuracy"] > 0.75, evals
    assert evals[-1]["eval/loss"] < math.log(2)
    assert all({"loss", "accuracy", "margin", "grad_norm", "lr"} <= r.keys() for r in logged)
    assert not records(trained, "rl") and not records(trained, "sft")
    assert (trained / "checkpoints" / "latest").read_text() == "reward_model-000030"


def test_saved_folder_loads_with_transformers_and_ranks_unseen_pairs(trained):
    folder = trained / "reward_model"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    fresh = synthetic_pairs(40, seed=99)  # pairs of the same rule the run never saw
    scores = RewardModel(str(folder), batch_size=16)(batch_of(fresh), RewardContext(None, TagFormat())).scores
    assert ranked_share(scores) > 0.75
    # the reward part's score is what the plain transformers model gives the same chat
    tokenizer = load_tokenizer(str(folder))
    chat = [{"role": "user", "content": fresh[0]["prompt"]}, {"role": "assistant", "content": fresh[0]["chosen"]}]
    ids = tokenizer.apply_chat_template(chat, tokenize=False)
    with torch.no_grad():
        plain = model(**tokenizer(ids, add_special_tokens=False, return_tensors="pt")).logits[0, 0]
    assert float(plain) == pytest.approx(scores[0], abs=1e-4)


def test_reward_part_normalizes_and_refuses_a_folder_that_is_no_reward_model(trained, tmp_path):
    folder = str(trained / "reward_model")
    batch, ctx = batch_of(synthetic_pairs(4, seed=5)), RewardContext(None, TagFormat())
    raw = RewardModel(folder)(batch, ctx).scores
    sigmoid = RewardModel(folder, normalize="sigmoid")(batch, ctx)
    assert sigmoid.scores == pytest.approx([1 / (1 + math.exp(-s)) for s in raw], abs=1e-6)
    assert sigmoid.extras["raw"] == raw
    standard = RewardModel(folder, normalize="batch")(batch, ctx).scores
    assert sum(standard) == pytest.approx(0, abs=1e-5)
    assert sum(s * s for s in standard) / len(standard) == pytest.approx(1, abs=1e-4)
    with pytest.raises(ConfigError, match="reward 'reward_model': path .* no Hugging Face model folder"):
        RewardPipeline([RewardConfig(name="reward_model", args={"path": str(tmp_path)})])
    with pytest.raises(ConfigError, match="holds a LlamaForCausalLM, not a sequence classifier"):
        RewardPipeline([RewardConfig(name="reward_model", args={"path": str(tiny_dir())})])
    with pytest.raises(ConfigError, match="normalize must be one of"):
        RewardPipeline([RewardConfig(name="reward_model", args={"path": folder, "normalize": "z"})])


def test_reward_model_serves_as_the_reward_of_rl(trained, tmp_path):
    recipe = tmp_path / "rl.yaml"
    recipe.write_text(
        "model: {name: tiny-random}\n"
        "data: {source: task:chain_sum, size: 8}\n"
        "generation: {num_generations: 2, prompts_per_step: 2, max_new_tokens: 8}\n"
        f"rewards: [{{name: reward_model, args: {{path: {trained / 'reward_model'}, batch_size: 3}}}}]\n"
        "rl: {steps: 2}\n"
    )
    assert train(recipe, tmp_path / "run") == 0
    logged = records(tmp_path / "run", "rl")
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["failed"] == 0 and math.isfinite(r["reward/reward_model/mean"]) for r in logged)
    assert all(r["reward/reward_model/min"] < r["reward/reward_model/max"] for r in logged)


def test_regression_objective_learns_the_labels(tmp_path):
    data = write_jsonl(tmp_path / "labels.jsonl", synthetic_labels(80, seed=1))
    stage = "{steps: 30, batch_size: 8, lr: 1.0e-3, objective: regression, eval_share: 0.25, "
    stage += f"data: {{source: {data}}}}}"
    assert train(recipe_file(tmp_path, stage), tmp_path / "run") == 0
    (last,) = [r for r in records(tmp_path / "run") if "eval/accuracy" in r]
    assert last["step"] == 30 and last["eval/n"] == 20
    assert last["eval/accuracy"] > 0.75 and last["eval/loss"] < 0.25  # 0.25: always answering 0.5
    scores = RewardModel(str(tmp_path / "run" / "reward_model"))(
        batch_of(synthetic_pairs(20, seed=98)), RewardContext(None, TagFormat())
    ).scores
    assert ranked_share(scores) > 0.75


def test_lora_reward_model_is_saved_merged(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(16, seed=2))
    stage = f"{{steps: 2, batch_size: 4, lr: 1.0e-3, lora: {{r: 4}}, data: {{source: {data}}}}}"
    assert train(recipe_file(tmp_path, stage), tmp_path / "run") == 0
    folder = tmp_path / "run" / "reward_model"
    assert not (folder / "adapter_config.json").exists()
    checkpoint = tmp_path / "run" / "checkpoints" / "reward_model-000002" / "reward_model"
    assert (checkpoint / "adapter_config.json").exists()
    AutoModelForSequenceClassification.from_pretrained(folder)


@pytest.mark.parametrize("lora", ["", "lora: {r: 4}, "])
def test_resume_after_a_crash_in_the_stage_matches_an_uninterrupted_run(tmp_path, crash_at, lora):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=3))
    stage = f"{{steps: 5, batch_size: 4, lr: 1.0e-3, eval_every: 2, {lora}data: {{source: {data}}}}}"
    path = recipe_file(tmp_path, stage, "run: {checkpoint_every: 1}\n")

    def run(name: str, resume: bool = False) -> Path:
        Run(load_recipe(path), tmp_path / name, resume=resume).execute()
        return tmp_path / name

    full = run("full")
    with crash_at(RewardModelTrainer, 4):
        run("crashed")
    crashed = run("crashed", resume=True)

    def comparable(record):
        return {k: v for k, v in record.items() if not k.startswith("time/")}

    assert [comparable(r) for r in records(full)] == [comparable(r) for r in records(crashed)]
    a, b = (load_file(d / "reward_model" / "model.safetensors") for d in (full, crashed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
    ("objective", "bad_row", "where"),
    [
        ("bradley_terry", {"prompt": "Hi.", "chosen": "thanks"}, "row 3, field 'rejected': missing"),
        ("bradley_terry", {"prompt": "Hi.", "chosen": 7, "rejected": "x"}, "row 3, field 'chosen': must be a str"),
        ("regression", {"prompt": "Hi.", "completion": "ok", "label": "high"}, "row 3, field 'label': must be"),
    ],
)
def test_bad_row_is_one_error_naming_file_row_and_field(tmp_path, capsys, objective, bad_row, where):
    good = synthetic_pairs(2, 4) if objective == "bradley_terry" else synthetic_labels(2, 4)
    data = write_jsonl(tmp_path / "rows.jsonl", [*good, bad_row, *good])
    stage = f"{{steps: 2, objective: {objective}, data: {{source: {data}}}}}"
    assert train(recipe_file(tmp_path, stage), tmp_path / "run") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {data}, {where}"), line
    assert not (tmp_path / "run").exists()  # refused before the run folder (or any model) was touched


def test_csv_without_a_column_the_objective_needs_is_one_error(tmp_path, capsys):
    data = tmp_path / "pairs.csv"
    data.write_text("prompt,chosen\nHi.,thanks\n")
    assert train(recipe_file(tmp_path, f"{{steps: 2, data: {{source: {data}}}}}"), tmp_path / "run") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"error: {data}, field 'rejected': no such column; the columns are: prompt, chosen"


def test_stage_without_data_or_with_nothing_to_train_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="reward_model: steps is 3 but no data is given"):
        load_recipe(recipe_file(tmp_path, "{steps: 3}"))
    with pytest.raises(ConfigError, match="nothing to train: rl.steps, sft.steps and reward_model.steps"):
        Run(load_recipe(recipe_file(tmp_path, "{steps: 0}")), tmp_path / "run")
