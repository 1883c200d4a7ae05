"""The logprob backends agree: one whole RL update gives the same gradients under ``fused`` and ``reference``
(full and LoRA, kernels on and off, both linear backends), scoring gives the same logprobs, and ``reference``
sends every gradient through autograd's accumulation."""

import functools
import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from incentive.config import ModelConfig, load_recipe
from incentive.logprob_backends import LOGPROB_BACKENDS, logprob_backend
from incentive.models import load_model
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch
from incentive.run import Run


@REWARDS.register("test-backends-even-tokens")
class EvenTokens(Reward):
    """Share of completion tokens with an even id: varies within a group, so every completion has an advantage."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        return RewardResult([sum(t % 2 == 0 for t in c.completion_ids) / max(1, c.length) for c in batch])


RECIPE = """
model: {{name: tiny-random, backend: {backend}, onednn: {onednn}{lora}}}
data: {{source: task:chain_sum, size: 8, task_args: {{min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}}}
generation: {{num_generations: 4, prompts_per_step: 2, max_new_tokens: 8, temperature: 0.8}}
rewards: [{{name: test-backends-even-tokens}}]
rl: {{steps: 1, num_iterations: 2}}
loss: {{kl_beta: 0.05}}
optim: {{max_grad_norm: null}}
"""


def _rl_update(tmp_path, backend: str, onednn: bool, lora: bool) -> tuple[list[list[torch.Tensor]], dict]:
    """One RL step of a real run (two optimizer steps on its batch, with old and reference logprobs scored):
    the gradients each optimizer step is handed, and the step's record."""
    extra = ", lora: {r: 4, dropout: 0.0}" if lora else ""
    path = tmp_path / f"{backend}.yaml"
    path.write_text(RECIPE.format(backend=backend, onednn=str(onednn).lower(), lora=extra))
    run = Run(load_recipe(path), tmp_path / backend)
    steps: list[list[torch.Tensor]] = []

    def record(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        params = [q for g in optimizer.param_groups for q in g["params"] if q.grad is not None]
        steps.append([q.grad.clone() for q in params])

    handle = register_optimizer_step_pre_hook(record)
    try:
        run.execute()
    finally:
        handle.remove()
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    return steps, next(r for r in map(json.loads, lines) if r.get("stage") == "rl")


def test_both_backends_are_registered_and_fused_is_the_default():
    assert LOGPROB_BACKENDS.names() == ["fused", "reference"]
    assert ModelConfig().backend == "fused"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_rl_update_has_the_same_gradients_under_both_backends(tmp_path, linear_backend, kernels, lora):
    onednn = linear_backend == "onednn"
    fused, fused_record = _rl_update(tmp_path, "fused", onednn, lora)
    reference, reference_record = _rl_update(tmp_path, "reference", onednn, lora)
    assert len(fused) == len(reference) == 2
    assert fused_record["reward/mean"] == reference_record["reward/mean"]  # the same completions
    assert fused_record["train/loss"] == pytest.approx(reference_record["train/loss"], rel=1e-5, abs=1e-6)
    for got, want in zip(fused, reference, strict=True):
        assert len(got) == len(want) > 0
        scale = max(float(w.abs().max()) for w in want)
        assert scale > 0
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)


def test_scoring_gives_the_same_logprobs_under_both_backends(tiny_each_backend, kernels):
    """Contexts shared whole (a prompt's completions), sharing a long prefix, and alone; an empty target."""
    model, _ = tiny_each_backend
    model.eval()
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 1000, (20,), generator=gen).tolist()
    contexts = [prompt, prompt, prompt + [5, 6, 7], prompt + [8], [11, 12, 13]]
    targets = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (6, 2, 4, 0, 9)]
    fused = logprob_backend("fused").score(model, contexts, targets, 64, temperature=0.8)
    reference = logprob_backend("reference").score(model, contexts, targets, 64, temperature=0.8)
    for got, want, target in zip(fused, reference, targets, strict=True):
        assert got.shape == want.shape == (len(target),)
        assert not got.requires_grad and not want.requires_grad
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _watch(params: dict[str, torch.nn.Parameter]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Hooks on ``params``: per parameter, the sum of the gradients autograd hands its ``AccumulateGrad``, and
    its ``.grad`` as that node leaves it (each time the node runs)."""
    delivered: dict[str, torch.Tensor] = {}
    accumulated: dict[str, torch.Tensor] = {}

    def deliver(name: str, grad: torch.Tensor | None) -> None:
        if grad is not None:  # a custom function gave no gradient for it (fused: written in place)
            delivered[name] = grad.clone() if name not in delivered else delivered[name] + grad

    def accumulate(name: str, param: torch.Tensor) -> None:
        if param.grad is not None:
            accumulated[name] = param.grad.clone()

    for name, param in params.items():
        param.register_hook(functools.partial(deliver, name))
        param.register_post_accumulate_grad_hook(functools.partial(accumulate, name))
    return delivered, accumulated


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reference_sends_every_gradient_through_autograds_accumulation(kernels, lora):
    """With ``reference``, every trainable parameter's ``.grad`` is the sum of what autograd delivered to it and
    stays as its ``AccumulateGrad`` left it; ``fused`` writes the vocabulary-sized ones in place instead."""
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (12, 7)]
    contexts = [prompts[0], prompts[0], prompts[1], prompts[1]]
    targets = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (5, 3, 6, 2)]

    def loss_of(rows: list[int], logps: list[torch.Tensor]) -> torch.Tensor:
        return -sum((lp.sum() * (i + 1) for i, lp in zip(rows, logps, strict=True)), torch.zeros(()))

    for name in ("reference", "fused"):
        torch.manual_seed(0)
        model = load_model("tiny-random")
        if lora:
            config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            model = get_peft_model(model, config)
        params = {n: q for n, q in model.named_parameters() if q.requires_grad}
        delivered, accumulated = _watch(params)
        logprob_backend(name).backward(model, contexts, targets, range(4), loss_of, 0.8)
        assert all(q.grad is not None for q in params.values())
        through_autograd = [
            n in delivered and torch.equal(delivered[n], q.grad) and torch.equal(accumulated[n], q.grad)
            for n, q in params.items()
        ]
        if name == "reference":
            assert all(through_autograd)
        elif not lora:
            assert not all(through_autograd)  # the embedding's and head's gradients went in place
