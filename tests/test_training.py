"""End-to-end behaviour of runs on the tiny random model: learning, resume, run-folder safety."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from incentive.config import ConfigError, load_recipe
from incentive.data.example import Example
from incentive.logprobs import target_logprobs
from incentive.models import load_model
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.verifier import RuleVerifier
from incentive.rollout.types import Completion, RolloutBatch
from incentive.run import Run, RunError
from incentive.templates import SingleBlockFormat, TagFormat
from incentive.training.rl import RLTrainer, TooManyFailures, advantage_stats, entropy_estimate, verdict
from incentive.training.sft import SFTTrainer


@REWARDS.register("test-even-tokens")
class EvenTokens(Reward):
    """Share of completion tokens with an even id: varies within groups, learnable by a tiny model."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        return RewardResult([sum(t % 2 == 0 for t in c.completion_ids) / max(1, c.length) for c in batch])


@REWARDS.register("test-digit-share")
class DigitShare(Reward):
    """Share of digit characters: a tiny model after a short SFT can raise it within a few RL steps."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        return RewardResult([sum(ch.isdigit() for ch in c.text) / max(1, len(c.text)) for c in batch])


RECIPE = """
model: {name: tiny-random}
data: {source: task:chain_sum, size: 40, task_args: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}
generation: {num_generations: 4, prompts_per_step: 4, max_new_tokens: 8}
rewards: [{name: test-even-tokens}]
"""


def make_run(tmp_path, extra, overrides=(), name="run", **kw):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE + extra)
    return Run(load_recipe(path, list(overrides)), tmp_path / name, **kw)


def rl_records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"rl"' in x]


def test_reward_goes_up(tmp_path):
    body = "sft: {steps: 12, lr: 1.0e-2, batch_size: 8}\nrl: {steps: 16}\noptim: {lr: 1.0e-3}\n"
    body += "rewards: [{name: test-digit-share}]\n"
    run = make_run(tmp_path, body, ["generation.max_new_tokens=12"])
    run.execute()
    rewards = [r["reward/mean"] for r in rl_records(run.dir)]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.08, rewards


def comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(("time/", "throughput/"))}


@pytest.mark.parametrize("extra", ["", "model: {name: tiny-random, lora: {r: 4}}\nloss: {kl_beta: 0.05}\n"])
def test_resume_after_crash_reproduces_uninterrupted_run(tmp_path, crash_at, extra):
    body = extra + "sft: {steps: 2, batch_size: 2, data: {source: task:chain_sum, size: 8}}\n"
    body += "rl: {steps: 4, num_iterations: 2}\noptim: {lr: 1.0e-3}\nrun: {checkpoint_every: 1}\n"
    if "loss" not in extra:
        body += "loss: {kl_beta: 0.05}\n"
    full = make_run(tmp_path, body, name="full")
    full.execute()

    crashed = make_run(tmp_path, body, name="crashed")
    with crash_at(RLTrainer, 3):
        crashed.execute()
    make_run(tmp_path, body, name="crashed", resume=True).execute()

    a, b = rl_records(full.dir), rl_records(crashed.dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [comparable(r) for r in a] == [comparable(r) for r in b]
    weights = "adapter_model.safetensors" if "lora" in extra else "model.safetensors"
    wa = load_file(full.dir / "checkpoints/rl-000004/policy" / weights)
    wb = load_file(crashed.dir / "checkpoints/rl-000004/policy" / weights)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_folder_is_not_overwritten(tmp_path):
    run = make_run(tmp_path, "rl: {steps: 1}\n")
    run.execute()
    with pytest.raises(RunError, match="already holds a run"):
        make_run(tmp_path, "rl: {steps: 1}\n")
    make_run(tmp_path, "rl: {steps: 1}\n", overwrite=True)


def test_bad_reward_args_fail_before_model_load(tmp_path):
    with pytest.raises(ConfigError, match="verifier"):
        make_run(tmp_path, "rl: {steps: 1}\nrewards: [{name: verifier, args: {nope: 1}}]\n")
    with pytest.raises(ConfigError, match="nothing to train"):
        make_run(tmp_path, "")


def test_failing_reward_is_recorded_not_fatal(tmp_path):
    @REWARDS.register("test-flaky")
    class Flaky(Reward):
        def __call__(self, batch, ctx):
            return RewardResult([math.nan if i % 4 == 0 else 1.0 for i in range(len(batch))], [])

    run = make_run(tmp_path, "rl: {steps: 2}\nrewards: [{name: test-even-tokens}, {name: test-flaky}]\n")
    run.execute()
    records = rl_records(run.dir)
    assert all(r["failed"] == 4 for r in records)
    assert all("test-flaky: non-finite score" in r["failures"] for r in records)


BROKEN = {"at": None}


@REWARDS.register("test-breaks-at")
class BreaksAt(Reward):
    """Even-token share, but every sample fails at the step named in ``BROKEN`` (a reward server going down)."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        if ctx.step == BROKEN["at"]:
            raise ConnectionError("reward server unreachable")
        return EvenTokens()(batch, ctx)


def test_too_many_failures_saves_checkpoint_and_resume_retries_the_step(tmp_path):
    body = "rl: {steps: 4}\noptim: {lr: 1.0e-3}\nrewards: [{name: test-breaks-at}]\n"
    full = make_run(tmp_path, body, name="full")
    full.execute()

    BROKEN["at"] = 3
    try:
        with pytest.raises(TooManyFailures, match="rl-000002 holds the run as it was before this step"):
            make_run(tmp_path, body, name="broken").execute()
    finally:
        BROKEN["at"] = None
    broken_dir = tmp_path / "broken"
    assert (broken_dir / "checkpoints/latest").read_text() == "rl-000002"
    assert [r["step"] for r in rl_records(broken_dir)] == [1, 2]
    make_run(tmp_path, body, name="broken", resume=True).execute()
    assert [comparable(r) for r in rl_records(full.dir)] == [comparable(r) for r in rl_records(broken_dir)]


def test_sigterm_saves_and_stops_then_resume_finishes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("test-even-tokens", "format") + "rl: {steps: 200}\n")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "incentive.cli", "train", str(recipe), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM" in err and "--resume" in err
    saved = (run_dir / "checkpoints" / "latest").read_text()
    steps_done = len(rl_records(run_dir))
    assert saved == f"rl-{steps_done:06d}"
    resumed = subprocess.run(
        [*cmd, "--resume", "--set", "rl.steps=" + str(steps_done + 1)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in rl_records(run_dir)] == list(range(1, steps_done + 2))


def test_time_budget_stops_rl_and_saves(tmp_path):
    run = make_run(tmp_path, "rl: {steps: 50, time_budget_s: 0.001}\n")
    run.execute()
    records = rl_records(run.dir)
    assert [r["step"] for r in records] == [1]
    assert (run.dir / "checkpoints" / "latest").read_text() == "rl-000001"


def test_sigkill_at_random_moment_then_resume_matches_uninterrupted(tmp_path):
    import random
    import signal
    import subprocess
    import sys
    import time

    body = "rl: {steps: 6}\noptim: {lr: 1.0e-3}\nrun: {checkpoint_every: 1}\nloss: {kl_beta: 0.05}\n"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE + body)
    # the test reward lives in this module, so runs are made in-process via a tiny launcher
    launcher = tmp_path / "launch.py"
    tests_dir = str(Path(__file__).parent)
    launcher.write_text(
        f"import sys\nsys.path.insert(0, {tests_dir!r})\nimport test_training  # registers test rewards\n"
        "from incentive.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    base = [sys.executable, str(launcher), "train", str(recipe)]
    subprocess.run([*base, "--run-dir", str(tmp_path / "full")], check=True, capture_output=True, timeout=300)
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(
        [*base, "--run-dir", str(crashed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = crashed / "metrics.jsonl"
    target_lines = random.Random().randint(1, 4)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= target_lines
    ):
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    subprocess.run(
        [*base, "--run-dir", str(crashed), "--resume"], check=True, capture_output=True, timeout=300
    )
    a, b = rl_records(tmp_path / "full"), rl_records(crashed)
    assert [comparable(r) for r in a] == [comparable(r) for r in b]
    wa = load_file(tmp_path / "full/checkpoints/rl-000006/policy/model.safetensors")
    wb = load_file(crashed / "checkpoints/rl-000006/policy/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class RecordingOptimizer(torch.optim.SGD):
    """Keeps a copy of each step's gradients instead of applying them."""

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None]


def sft_gradients(tiny, batch_size: int, grad_accum: int, micro_batch_tokens: int):
    model, tokenizer = tiny
    pairs = [
        (f"Q{i}: what is {i} + {i * 3}?", f"<answer>{i * 4}</answer>" + " so" * (i % 3)) for i in range(10)
    ]
    optimizer = RecordingOptimizer(list(model.parameters()), lr=0.0)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    args = (model, tokenizer, pairs, batch_size, optimizer, scheduler, 0, micro_batch_tokens, None)
    trainer = SFTTrainer(*args, grad_accum=grad_accum)
    record = trainer.step(1)
    return optimizer.grads, record


def test_sft_grad_accum_equals_one_big_batch(tiny):
    big, big_record = sft_gradients(tiny, 8, 1, 4096)
    # 4 batches of 2, each cut further by the token budget
    accumulated, record = sft_gradients(tiny, 2, 4, 40)
    assert record["tokens"] == big_record["tokens"]
    assert record["loss"] == pytest.approx(big_record["loss"], rel=1e-5)
    assert len(accumulated) == len(big)
    for a, b in zip(accumulated, big, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    small, _ = sft_gradients(tiny, 2, 1, 4096)
    assert not torch.allclose(small[0], big[0])  # one batch of 2 alone is a different step


def test_recipe_grad_accum_reaches_the_sft_step(tmp_path):
    def sft_record(name, sft):
        run = make_run(tmp_path, f"sft: {{steps: 1, {sft}}}\nrl: {{steps: 0}}\n", name=name)
        run.execute()
        lines = (run.dir / "metrics.jsonl").read_text().splitlines()
        return next(r for r in map(json.loads, lines) if r.get("stage") == "sft")

    accumulated, big = sft_record("accum", "batch_size: 2, grad_accum: 3"), sft_record("big", "batch_size: 6")
    assert accumulated["tokens"] == big["tokens"]
    assert accumulated["loss"] == pytest.approx(big["loss"], rel=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_kl_reference_is_the_policy_as_rl_starts_after_sft(tmp_path, monkeypatch, lora):
    body = "sft: {steps: 3, lr: 1.0e-2, batch_size: 4}\nrl: {steps: 1}\nloss: {kl_beta: 0.05}\n"
    body += "model: {name: tiny-random, lora: {r: 4}}\n" if lora else ""
    seen = []
    original = RLTrainer._reference_logprobs

    def record(self, contexts, targets):
        ref = original(self, contexts, targets)
        with torch.no_grad():
            self.p.policy.eval()
            policy = [lp.tolist() for lp in target_logprobs(self.p.policy, contexts, targets)]
            self.p.policy.train()
        base = [lp.tolist() for lp in target_logprobs(load_model("tiny-random"), contexts, targets)]
        seen.append((ref, policy, base))
        return ref

    monkeypatch.setattr(RLTrainer, "_reference_logprobs", record)
    make_run(tmp_path, body).execute()
    ((ref, policy, base),) = seen
    flat = [torch.tensor(sum(x, [])) for x in (ref, policy, base)]
    torch.testing.assert_close(flat[0], flat[1], rtol=0, atol=1e-5)
    assert (flat[0] - flat[2]).abs().max() > 1e-2  # SFT moved the policy away from the base


def test_entropy_estimate_is_the_mean_negative_logprob_of_the_policys_tokens():
    ex = Example("3 + 4 =", "7")
    batch = RolloutBatch(
        [
            Completion(0, ex, "", [1], [5, 6, 7], "a", logprobs=[-0.5, -1.0, -2.5]),
            # a tool episode: the two tool-written tokens in the middle are not the policy's
            Completion(0, ex, "", [1], [5, 6, 7, 8], "b", [-1.5, 0.0, 0.0, -3.0], loss_mask=[1, 0, 0, 1]),
            Completion(1, ex, "", [1], [5, 6], "c"),  # no sampling logprobs: left out
        ]
    )
    expected = (0.5 + 1.0 + 2.5 + 1.5 + 3.0) / 5
    assert entropy_estimate(batch) == {"policy/entropy_estimate": pytest.approx(expected)}
    assert entropy_estimate(RolloutBatch(batch.completions[2:])) == {}


def test_logged_entropy_estimate_is_that_of_the_steps_sampled_tokens(tmp_path, monkeypatch):
    seen = []
    original = RLTrainer._record

    def record(self, step, batch, *rest):
        out = original(self, step, batch, *rest)
        seen.append((batch, out))
        return out

    monkeypatch.setattr(RLTrainer, "_record", record)
    run = make_run(tmp_path, "rl: {steps: 1}\n")
    run.execute()
    ((batch, out),) = seen
    logprobs = [lp for c in batch for lp in c.logprobs]
    assert len(logprobs) == sum(c.length for c in batch) > 0
    assert out["policy/entropy_estimate"] == pytest.approx(-sum(logprobs) / len(logprobs))
    assert rl_records(run.dir)[0]["policy/entropy_estimate"] == out["policy/entropy_estimate"]


def test_advantage_stats_on_a_hand_made_batch():
    # groups interleaved: 0 varies, 1 has equal rewards, 2 has one valid reward, 3 varies
    groups = [0, 1, 2, 3, 0, 1, 2, 3, 3]
    scores = [1.0, 0.5, math.nan, 0.0, 0.0, 0.5, 1.0, 1.0, math.nan]
    advantages = torch.tensor([0.7, 0.0, 0.0, -0.5, -0.7, 0.0, 0.0, 0.5, 0.0])
    stats = advantage_stats(advantages, scores, groups)
    assert stats["advantage/std"] == pytest.approx(math.sqrt((2 * 0.49 + 2 * 0.25) / 9))
    assert stats["advantage/zero_share"] == pytest.approx(5 / 9)
    assert stats["advantage/no_signal_group_share"] == 0.5


def test_verdict_judges_a_logged_completion_strictly_and_regardless_of_format():
    tags, sum_of = TagFormat(), Example("3 + 4 =", "7")

    def judge(text, example=sum_of, fmt=tags):
        return verdict(Completion(0, example, "", [1], [1], text), fmt.parse(text), fmt, RuleVerifier())

    right, wrong = "<think>3 + 4</think><answer>7</answer>", "<think>3 + 4</think><answer>8</answer>"
    assert judge(right) == {"correct": True, "correct_lenient": True, "answer": "7"}
    assert judge(wrong) == {"correct": False, "correct_lenient": False, "answer": "8"}
    assert judge("3 + 4 makes 7") == {"correct": False, "correct_lenient": True, "answer": "7"}
    assert judge(right, Example("3 + 4 =", ""))["correct"] is None  # nothing to judge against
    assert judge("<think>a story</think>", fmt=SingleBlockFormat())["correct"] is None  # no answer block


def test_logged_samples_are_judged_by_the_evals_verifier_where_it_needs_no_model():
    from incentive.rewards.verifier import RuleVerifier
    from incentive.rewards.wordings import AcceptedWordings
    from incentive.training.rl import sample_judge

    assert isinstance(sample_judge("accepted_wordings"), AcceptedWordings)
    assert isinstance(sample_judge("rule"), RuleVerifier)
    assert isinstance(sample_judge("tinyv"), RuleVerifier)  # an LLM judge would cost a generation per sample
