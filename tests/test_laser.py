"""LASER / LASER-D / LASER-DE against the worked numbers of methods/laser.md §9, and the RL hook mechanism."""

import json

from incentive.config import load_recipe
from incentive.data import Example
from incentive.hooks import HOOKS, Hook
from incentive.rewards.base import RewardContext
from incentive.rewards.laser import (
    STATE_KEY,
    Laser,
    LaserD,
    LaserDE,
    choose_target,
    difficulty_bucket,
    estimate_targets,
    expected_correct,
    length_thresholds,
    repetition_start,
)
from incentive.rollout.types import Completion, RolloutBatch
from incentive.run import Run
from incentive.templates import TagFormat
from incentive.training.rl import RLTrainer

RIGHT, WRONG, UNFORMATTED = (
    "<think>3+4</think><answer>7</answer>",
    "<think>3+4</think><answer>8</answer>",
    "7",
)


def completion(kind: str, length: int, group: int = 0, ids: list[int] | None = None) -> Completion:
    text = {"right": RIGHT, "wrong": WRONG, "unformatted": UNFORMATTED}[kind]
    token_ids = ids if ids is not None else list(range(length))
    return Completion(group, Example("3 + 4 =", "7"), "", [1], token_ids, text)


def scores(reward, items, state=None):
    batch = RolloutBatch([completion(*item) for item in items])
    ctx = RewardContext(None, TagFormat(), state=state or {})
    return reward(batch, ctx).scores


def test_laser_table():
    laser = Laser(target_length=100, alpha=0.5)
    table = [("right", 80), ("right", 120), ("wrong", 80), ("unformatted", 80)]
    assert scores(laser, table) == [1.5, 1.0, -0.5, -1.0]
    assert scores(Laser(target_length=100, kind="penalty"), [("right", 120), ("right", 80)]) == [0.5, 1.0]
    assert scores(Laser(target_length=100, kind="hybrid"), [("right", 120), ("right", 80)]) == [0.5, 1.5]


def test_bucket_assignment():
    assert [difficulty_bucket(k, 8) for k in (8, 6, 3, 2, 0)] == ["high", "high", "medium", "low", "low"]
    # one convention for reward and monitor time (spec pitfall 1): acc = 2/3 is high, 1/3 is medium
    assert [difficulty_bucket(k, 3) for k in (2, 1, 0)] == ["high", "medium", "low"]


def test_thresholds_and_expected_correct():
    assert length_thresholds(1024, 4096, 1024) == [1024, 2048, 3072, 4096]
    assert length_thresholds(512, 3072, 1024) == [512, 1024, 2048, 3072]
    assert [expected_correct(b, 8) for b in ("high", "medium", "low")] == [5, 2, 1]
    assert [expected_correct(b, 8, "ceil") for b in ("high", "medium", "low")] == [6, 3, 1]


THRESHOLDS = [1024, 2048, 3072]


def test_target_selection_worked_numbers():
    easy = [1000, 1500, 2500, 3000]  # coverage 0.25 at 1024: floor(0.25 * 5) = 1
    assert choose_target(easy, THRESHOLDS, "high", 8) == 1024
    medium = [1000] * 4 + [2000] * 2 + [3000] * 4  # coverage 0.4, 0.6, 1.0 → floor(0.6 * 2) = 1 at 2048
    assert choose_target(medium, THRESHOLDS, "medium", 8) == 2048
    hard = [1000] * 18 + [2000, 3000]  # coverage 0.9, 0.95, 1.0
    assert choose_target(hard, THRESHOLDS, "low", 8) == 3072
    assert choose_target([1000] * 19 + [4000], THRESHOLDS, "low", 8) is None  # never 1.0 → batch max
    assert choose_target([], THRESHOLDS, "high", 8) is None  # empty bucket
    # ceil: no flooring of the product; 0.4 * 3 = 1.2 ≥ 1 already at 1024
    assert choose_target(medium, THRESHOLDS, "medium", 8, round_method="ceil") == 1024


def test_estimate_targets_with_all_correct_and_all_wrong_groups():
    groups = [([100, 200, 300, 400], [True] * 4), ([900] * 4, [False] * 4)]
    targets = estimate_targets(groups, [250, 500, 1000], n=4)
    # high: C = floor(8/3) = 2, coverage 0.5 at 250 → 1; medium is empty; low needs every response covered
    assert targets == {"high": 250, "medium": None, "low": 1000}


def test_laser_d_uses_group_bucket_and_falls_back_to_batch_max():
    reward = LaserD(target_length=1000)
    # group 0: 2/2 correct (high), group 1: 1/2 (medium)
    items = [("right", 50, 0), ("right", 150, 0), ("right", 150, 1), ("wrong", 90, 1)]
    assert scores(reward, items) == [1.5, 1.5, 1.5, -0.5]  # no monitoring yet: static 1000
    state = {STATE_KEY: {"high": 100, "medium": None, "low": 10}}
    assert scores(reward, items, state) == [1.5, 1.0, 1.5, -0.5]  # medium: batch max 150 → no pressure


def test_laser_de_explores_on_long_wrong_answers():
    reward = LaserDE(target_length=20)
    repetitive = [1, 2, 3, 4] * 10
    items = [
        ("wrong", 40, 0, list(range(40))),
        ("wrong", 40, 0, repetitive),
        ("wrong", 10, 0, None),
        ("unformatted", 40, 0, None),
        ("right", 10, 0, None),
    ]
    assert scores(reward, items) == [0.0, -0.5, -0.5, -1.0, 1.5]


def test_repetition_detector():
    assert repetition_start([1, 2, 3, 4] * 20) < 80
    assert repetition_start(list(range(80))) == 80
    assert repetition_start([1, 2, 1, 2]) == 4  # too short to judge
    assert repetition_start([5] * 50) < 50  # one-token n-grams are skipped, the 2n-pattern check still fires
    long = list(range(1000, 1300))  # 300 tokens: an n-gram must recur three times
    twice = long[:100] + [7, 8, 9, 10] + long[100:150] + [7, 8, 9, 10] + long[150:]
    assert repetition_start(twice) == len(twice)
    thrice = twice[:200] + [7, 8, 9, 10] + twice[200:]
    assert repetition_start(thrice) == 100


# -- the hook mechanism ------------------------------------------------------------------------------------------


@HOOKS.register("test-counter")
class Counter(Hook):
    """Counts its calls in its own state and publishes the count to the shared state."""

    def __init__(self) -> None:
        self.calls = 0

    def start(self, trainer):
        trainer.state["started"] = True

    def after_step(self, step, record, trainer):
        self.calls += 1
        trainer.state["count"] = self.calls
        record["counter/calls"] = self.calls
        record["counter/started"] = trainer.state["started"]

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


RECIPE = """
model: {name: tiny-random}
data: {source: task:chain_sum, size: 8, task_args: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}
generation: {num_generations: 2, prompts_per_step: 2, max_new_tokens: 6}
rewards: [{name: laser_d, args: {target_length: 4}}]
run: {checkpoint_every: 1}
rl: {steps: 4}
"""


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if '"rl"' in x]


def test_hook_state_survives_checkpoint_and_resume(tmp_path, crash_at):
    path = tmp_path / "r.yaml"
    path.write_text(
        RECIPE + "hooks: [{name: test-counter}, {name: laser_monitor, args: {every: 2, size: 3}}]\n"
    )
    with crash_at(RLTrainer, 3):
        Run(load_recipe(path), tmp_path / "run").execute()
    Run(load_recipe(path), tmp_path / "run", resume=True).execute()
    got = records(tmp_path / "run")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["counter/calls"] for r in got] == [1, 2, 3, 4]
    assert all(r["counter/started"] for r in got)
    # the monitor ran before step 1 and after steps 2 and 4: targets change only at those steps
    assert [r["laser/monitor_passes"] for r in got] == [1, 2, 2, 3]
    assert ["time/laser_monitor_s" in r for r in got] == [False, True, False, True]
