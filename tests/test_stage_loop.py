"""The stage loop and hook events: one loop drives SFT and RL (and the reward model), hooks hear each event in
order, the built-in hooks (proxy sync, held-out evals) act where they did, and resuming checks the hooks."""

from __future__ import annotations

import json

import pytest

from incentive.config import load_recipe
from incentive.hooks import HOOKS, Hook
from incentive.hooks.builtin import HeldOutEval
from incentive.run import Run
from incentive.training.rl import RLTrainer
from incentive.training.stage import StageStateMismatch

EVENTS: list[tuple] = []


@HOOKS.register("test-event-log")
class EventLog(Hook):
    """Logs every event it hears, in SFT and RL, with what it was given."""

    stages = ("sft", "rl")

    def start(self, trainer):
        EVENTS.append(("start", trainer.name))

    def before_rollout(self, step, trainer):
        EVENTS.append(("before_rollout", trainer.name, step, trainer.group_counter))

    def after_rewards(self, step, batch, scored, trainer):
        EVENTS.append(("after_rewards", trainer.name, step, len(batch), len(scored.total)))

    def after_step(self, step, record, trainer):
        EVENTS.append(("after_step", trainer.name, step, record["step"]))
        record["log/events"] = len(EVENTS)

    def on_checkpoint(self, step, folder, trainer):
        latest = (folder.parent / "latest").read_text().strip()
        EVENTS.append(("on_checkpoint", trainer.name, step, folder.name, latest == folder.name))


RECIPE = """
model: {name: tiny-random}
data: {source: task:chain_sum, size: 8, task_args: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}
generation: {num_generations: 2, prompts_per_step: 2, max_new_tokens: 6}
rewards: [{name: format}]
sft: {steps: 2, batch_size: 2}
rl: {steps: 3}
run: {checkpoint_every: 2}
hooks: [{name: test-event-log}]
"""


def write(tmp_path, extra=""):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + extra)
    return path


def test_hooks_hear_every_event_of_both_stages_in_order(tmp_path):
    EVENTS.clear()
    Run(load_recipe(write(tmp_path)), tmp_path / "run").execute()
    assert EVENTS == [
        ("start", "sft"),
        ("after_step", "sft", 1, 1),
        ("after_step", "sft", 2, 2),
        ("on_checkpoint", "sft", 2, "sft-000002", True),
        ("start", "rl"),
        ("before_rollout", "rl", 1, 0),
        ("after_rewards", "rl", 1, 4, 4),
        ("after_step", "rl", 1, 1),
        ("before_rollout", "rl", 2, 2),
        ("after_rewards", "rl", 2, 4, 4),
        ("after_step", "rl", 2, 2),
        ("on_checkpoint", "rl", 2, "rl-000002", True),
        ("before_rollout", "rl", 3, 4),
        ("after_rewards", "rl", 3, 4, 4),
        ("after_step", "rl", 3, 3),
        ("on_checkpoint", "rl", 3, "rl-000003", True),
    ]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(x) for x in lines]
    assert [r["log/events"] for r in logged if "log/events" in r] == [2, 3, 8, 11, 15]


def test_a_resumed_stage_restores_instead_of_starting(tmp_path, crash_at):
    path = write(tmp_path)
    with crash_at(RLTrainer, 3):
        Run(load_recipe(path), tmp_path / "run").execute()
    EVENTS.clear()
    Run(load_recipe(path), tmp_path / "run", resume=True).execute()
    assert ("start", "rl") not in EVENTS
    assert EVENTS[0] == ("before_rollout", "rl", 3, 4)  # the group counter as the checkpoint left it


def test_resuming_with_other_hooks_is_refused(tmp_path):
    path = write(tmp_path)
    Run(load_recipe(path), tmp_path / "run").execute()
    fewer = tmp_path / "fewer.yaml"
    fewer.write_text(RECIPE.replace("hooks: [{name: test-event-log}]", ""))
    with pytest.raises(StageStateMismatch, match="state of 2 rl hooks, the recipe has 1"):
        Run(load_recipe(fewer), tmp_path / "run", resume=True).execute()


def test_held_out_eval_runs_every_n_steps_and_at_the_last_only_when_asked():
    def calls(at_last):
        seen = []
        hook = HeldOutEval("rl", 2, 5, lambda step: seen.append(step) or {"eval/x": step}, at_last)
        records = [{} for _ in range(5)]
        for step, record in enumerate(records, 1):
            hook.after_step(step, record, None)
        return seen, records

    assert calls(False)[0] == [2, 4]
    seen, records = calls(True)
    assert seen == [2, 4, 5] and records[4] == {"eval/x": 5} and records[0] == {}
    assert HeldOutEval("sft", 0, 3, lambda step: {}, True).stages == ("sft",)


def test_proxy_sync_is_a_hook_whose_state_is_the_proxy(tmp_path):
    path = write(
        tmp_path,
        "proxy: {enabled: true, sync_every: 2, alpha: 0.5}\n",
    )
    Run(load_recipe(path), tmp_path / "run").execute()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rl = [json.loads(x) for x in lines if '"rl"' in x]
    assert [r.get("proxy/synced") for r in rl] == [None, 1, None]
    import torch

    state = torch.load(tmp_path / "run" / "checkpoints" / "rl-000003" / "trainer.pt", weights_only=False)
    proxy_state, *others = state["hooks"]
    assert others == [{}, {}]  # the event log, the held-out eval
    assert proxy_state and all(isinstance(v, torch.Tensor) for v in proxy_state.values())


def test_eval_stages_pick_the_stage_end_evals(tmp_path):
    evals = (
        "eval: {data: {source: task:chain_sum, size: 3, seed: 9, task_args: {min_terms: 2, max_terms: 2, "
        "min_digits: 1, max_digits: 1}}, max_new_tokens: 4, stages: [sft, rl]}\n"
    )
    run = Run(load_recipe(write(tmp_path, evals)), tmp_path / "run")
    run.execute()
    done = json.loads((tmp_path / "run" / "evals.json").read_text())
    assert sorted(done) == ["rl", "sft"]
    assert run.comparison is not None and run.comparison["a_stage"] == "sft"
    only_rl = Run(load_recipe(write(tmp_path, evals.replace("[sft, rl]", "[rl]"))), tmp_path / "rl-only")
    only_rl.execute()
    assert sorted(json.loads((tmp_path / "rl-only" / "evals.json").read_text())) == ["rl"]
    assert only_rl.comparison is None  # nothing to pair RL with
