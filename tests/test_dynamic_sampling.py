"""DAPO-style trainer options: dynamic sampling (drop groups whose rewards do not vary, refill, count), masking
truncated completions out of the loss, and the soft overlong penalty."""

import json

import pytest

from incentive.config import load_recipe
from incentive.data import DataConfig, Example, load_examples
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.overlong import SoftOverlongPenalty, overlong_penalty
from incentive.rollout.types import Completion, RolloutBatch
from incentive.run import Run
from incentive.templates import TagFormat
from incentive.training.rl import _varies
from incentive.training.sampler import EpochSampler

DATA = {
    "source": "task:chain_sum",
    "size": 10,
    "task_args": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
}


def informative(example) -> bool:
    return int(example.id.rsplit(":", 1)[1]) % 3 == 0


@REWARDS.register("test-every-third-varies")
class EveryThirdVaries(Reward):
    """Varies within a group only for every third example; constant (no signal) elsewhere."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        position: dict[int, int] = {}
        scores = []
        for c in batch:
            k = position[c.group_id] = position.get(c.group_id, -1) + 1
            scores.append(float(k) if informative(c.example) else 1.0)
        return RewardResult(scores)


def run(tmp_path, body):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{name: tiny-random}}\ndata: {json.dumps(DATA)}\nrewards: [{{name: test-every-third-varies}}]\n"
        + body
    )
    Run(load_recipe(path), tmp_path / "run").execute()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if '"rl"' in x]


def expected_counts(steps, want, max_rounds):
    """Replays the sampler: (kept, dropped, extra rounds) per step."""
    sampler = EpochSampler(load_examples(DataConfig(**DATA)).examples, 0)
    out = []
    for _ in range(steps):
        taken = sampler.take(want)
        kept, dropped, rounds = 0, 0, 0
        while True:
            good = sum(informative(e) for e in taken)
            kept, dropped = kept + good, dropped + len(taken) - good
            if kept >= want or rounds >= max_rounds:
                break
            rounds += 1
            taken = sampler.take(want - kept)
        out.append((kept, dropped, rounds))
    return out


def test_dynamic_sampling_drops_refills_and_counts(tmp_path):
    body = "generation: {num_generations: 2, prompts_per_step: 2, max_new_tokens: 4}\n"
    body += "rl: {steps: 3, dynamic_sampling: {enabled: true, max_rounds: 2}}\n"
    records = run(tmp_path, body)
    got = [
        (r["sampling/kept_groups"], r["sampling/dropped_groups"], r["sampling/extra_rounds"]) for r in records
    ]
    expected = expected_counts(3, 2, 2)
    assert got == [tuple(float(x) for x in e) for e in expected]
    for record, (kept, _, _) in zip(records, expected, strict=True):
        if kept:
            assert record["completions"] == 2 * kept  # only the kept groups are trained on and logged
            assert record["reward/min"] == 0.0 and record["reward/max"] == 1.0


def test_no_informative_group_skips_the_update(tmp_path):
    body = "generation: {num_generations: 2, prompts_per_step: 2, max_new_tokens: 4}\n"
    body += "rewards: [{name: format}]\nrl: {steps: 1, dynamic_sampling: {enabled: true, max_rounds: 1}}\n"
    (record,) = run(tmp_path, body)
    assert record["sampling/kept_groups"] == 0.0
    assert record["sampling/dropped_groups"] == 4.0 and record["sampling/extra_rounds"] == 1.0
    assert record["train/skipped"] == 1.0


def test_truncated_completions_are_masked(tmp_path):
    body = "generation: {num_generations: 2, prompts_per_step: 2, max_new_tokens: 3}\n"
    body += "rl: {steps: 1, mask_truncated: true, skip_zero_advantage: false}\n"
    (record,) = run(tmp_path, body)
    truncated = round(record["truncated_share"] * record["completions"])
    assert truncated > 0
    assert record["train/masked_truncated"] == truncated
    assert record.get("train/trained_sequences", 0.0) == record["completions"] - truncated


def test_varies():
    assert _varies([0.0, 1.0]) and not _varies([1.0, 1.0]) and not _varies([1.0])
    assert not _varies([float("nan"), 1.0]) and _varies([float("nan"), 1.0, 0.5])


@pytest.mark.parametrize(("length", "expected"), [(10, 0.0), (15, 0.0), (17, -0.4), (20, -1.0), (25, -1.0)])
def test_soft_overlong_penalty(length, expected):
    assert overlong_penalty(length, max_length=20, cache=5) == pytest.approx(expected)


def test_overlong_penalty_defaults_to_the_generation_limit():
    batch = RolloutBatch([Completion(0, Example("q", "a"), "", [1], list(range(n)), "") for n in (5, 9, 10)])
    scores = SoftOverlongPenalty()(batch, RewardContext(None, TagFormat(), max_new_tokens=10)).scores
    assert scores == pytest.approx([0.0, -0.5, -1.0])  # cache = 10 // 5 = 2
    with pytest.raises(ValueError, match="max_length"):
        SoftOverlongPenalty()(batch, RewardContext(None, TagFormat()))
