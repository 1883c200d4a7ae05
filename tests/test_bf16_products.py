from contextlib import nullcontext

import pytest
import torch

from incentive.config import ModelConfig, load_recipe
from incentive.models import bf16_products
from incentive.models.bf16_products import (
    bf16_linear,
    has_bf16_products,
    reference_bf16_linear,
    require_bf16_products,
    rounded,
)
from incentive.models.onednn import onednn_available, onednn_linear
from incentive.rewards.base import REWARDS, Reward, RewardResult
from incentive.run import Run
from incentive.training.rl import RLTrainer

runs_here = pytest.mark.skipif(
    not (onednn_available() and has_bf16_products()),
    reason="this CPU has no bf16 instructions (avx512_bf16, amx_bf16) or this torch build no oneDNN",
)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True), ("fpu avx512f avx2", False)],
)
def test_bf16_instructions_are_read_from_the_cpu_flags(tmp_path, flags, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(f"vendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n")
    assert has_bf16_products(info) is expected
    assert has_bf16_products(tmp_path / "missing") is False


def test_bf16_products_are_refused_where_they_would_be_emulated(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu avx512f avx2\n")
    with pytest.raises(ValueError, match="avx512_bf16 or amx_bf16"):
        require_bf16_products(info)
    monkeypatch.setattr(bf16_products, "has_bf16_products", lambda *a: False)
    with pytest.raises(ValueError, match="update_products: bfloat16 needs a CPU"):
        ModelConfig(update_products="bfloat16")
    assert ModelConfig().update_products == "float32"


def test_bf16_products_need_onednn(monkeypatch):
    monkeypatch.setattr(bf16_products, "has_bf16_products", lambda *a: True)
    with pytest.raises(ValueError, match="leave model.onednn unset"):
        ModelConfig(update_products="bfloat16", onednn=False)
    assert ModelConfig(update_products="bfloat16", onednn=True).update_products == "bfloat16"


def _inputs(rows: int = 33, d_in: int = 96, d_out: int = 80):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=gen, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
    b = torch.nn.Parameter(torch.randn(d_out, generator=gen))
    return x, w, b


def _forward_backward(fn, x, w, b):
    for t in (x, w, b):
        t.grad = None
    y = fn(x, w, b)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return y.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone()


@runs_here
def test_bf16_linear_equals_the_pytorch_reference_and_stays_near_fp32():
    x, w, b = _inputs()
    fast = _forward_backward(bf16_linear, x, w, b)
    ref = _forward_backward(reference_bf16_linear, x, w, b)
    exact = _forward_backward(torch.nn.functional.linear, x, w, b)
    for got, want, full in zip(fast[:3], ref[:3], exact[:3], strict=True):  # output, input and weight grads
        assert got.dtype == torch.float32
        # the same bf16 products; oneDNN may sum in another order than PyTorch's bf16 path
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
        rel = (got - full).norm() / full.norm()
        assert 1e-5 < rel < 1e-2  # rounded to bf16 (not fp32 in disguise), and only that far
    assert torch.equal(fast[3], exact[3])  # the bias gradient is a sum in fp32


@runs_here
def test_onednn_linear_runs_in_bf16_only_inside_the_block():
    x, w, b = _inputs()
    outside = onednn_linear(x, w, b)
    with bf16_products.bf16_products():
        inside = onednn_linear(x, w, b)
        torch.testing.assert_close(inside, bf16_linear(x, w, b), rtol=0, atol=0)
    assert torch.equal(onednn_linear(x, w, b), outside)
    assert not torch.equal(inside, outside)


def test_a_weight_is_rounded_once_until_it_changes_and_an_activation_every_time():
    x, w, b = _inputs()
    with bf16_products.bf16_products():
        first = rounded(w)
        assert rounded(w) is first
        assert rounded(w.t()) is rounded(w.t()) and rounded(w.t()).shape == (w.shape[1], w.shape[0])
        assert rounded(x) is not rounded(x)
        optimizer = torch.optim.AdamW([w], lr=0.1, fused=True)
        w.grad = torch.ones_like(w)
        optimizer.step()  # inside the block when rl.num_iterations > 1; fused AdamW leaves w._version as it was
        bf16_products.weights_changed()
        assert rounded(w) is not first
        assert torch.equal(rounded(w), w.detach().to(torch.bfloat16))
        second = rounded(w)
        with torch.no_grad():
            w.mul_(0.5)  # an in-place write bumps the version: a new copy without being told
        assert rounded(w) is not second and torch.equal(rounded(w), w.detach().to(torch.bfloat16))
        assert rounded(w).grad_fn is None
    assert not bf16_products.active()
    assert rounded(w) is not rounded(w)  # outside the block nothing is kept


@runs_here
def test_rl_update_in_bf16_gives_the_fp32_gradient_to_bf16_rounding():
    from incentive.logprob_backends import logprob_backend
    from incentive.models import load_model

    model = load_model("tiny-random", onednn=True)
    gen = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (6, 6, 9, 9)]
    targets = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 3, 7, 2)]
    backend = logprob_backend("fused")

    def loss_of(rows, logp):
        return sum((lp * (k + 1)).sum() for k, lp in zip(rows, logp, strict=True))

    grads = []
    for bf16 in (False, True):
        model.zero_grad(set_to_none=True)
        with bf16_products.bf16_products() if bf16 else nullcontext():
            backend.backward(model, contexts, targets, list(range(4)), loss_of)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    fp32, bf16 = grads
    rel = (bf16 - fp32).norm() / fp32.norm()
    assert 1e-5 < rel < 3e-2


@REWARDS.register("test-bf16-odd-tokens")
class OddTokens(Reward):
    """Share of odd token ids: varies within groups, so every step trains."""

    def __call__(self, batch, ctx):
        return RewardResult([sum(t % 2 for t in c.completion_ids) / max(1, c.length) for c in batch])


@runs_here
def test_a_run_multiplies_in_bf16_in_its_update_only(tmp_path, monkeypatch):
    calls = {"update": 0, "elsewhere": 0}
    in_update = [False]
    product, optimise = bf16_products.Bf16Linear.apply, RLTrainer._optimise

    def counted_product(*args):
        calls["update" if in_update[0] else "elsewhere"] += 1
        return product(*args)

    def marked_optimise(self, batch):
        in_update[0] = True
        try:
            return optimise(self, batch)
        finally:
            in_update[0] = False

    monkeypatch.setattr(bf16_products.Bf16Linear, "apply", counted_product)
    monkeypatch.setattr(RLTrainer, "_optimise", marked_optimise)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {name: tiny-random, update_products: bfloat16}\n"
        "data: {source: task:chain_sum, size: 8, task_args: {min_terms: 2, max_terms: 2}}\n"
        "generation: {num_generations: 4, prompts_per_step: 2, max_new_tokens: 6}\n"
        "rewards: [{name: test-bf16-odd-tokens}]\nrl: {steps: 2}\n"
    )
    Run(load_recipe(recipe), tmp_path / "run").execute()
    assert calls["update"] > 0 and calls["elsewhere"] == 0
