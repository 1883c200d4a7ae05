"""The fused LM head: the same logprobs and gradients as log-softmax over full logits, in any chunking."""

import contextlib

import pytest
import torch

from incentive import lm_head
from incentive.grad_in_place import gradients_in_place
from incentive.lm_head import FusedHead, LogitsHead, head_for, target_logprobs_from_hidden
from incentive.logprobs import _shared_context_logprobs
from incentive.models import bf16_products, load_model
from incentive.models.onednn import onednn_available


@pytest.mark.parametrize(
    ("chunk", "kept"), [(256, 4), (3, 4), (3, 2)]
)  # one chunk; 4 all kept; 2 of 4 made again
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("onednn", [False, True])
def test_fused_logprobs_and_gradients_equal_full_log_softmax(monkeypatch, chunk, kept, temperature, onednn):
    if onednn and not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(lm_head, "CHUNK_POSITIONS", chunk)
    monkeypatch.setattr(lm_head, "KEPT_CHUNKS", kept)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=gen)
    weight = torch.randn(300, 16, generator=gen)
    tokens = torch.randint(0, 300, (10,), generator=gen)
    upstream = torch.randn(10, generator=gen)

    def run(fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = fn(h, w)
        (out * upstream).sum().backward()
        return out.detach(), h.grad, w.grad

    def reference(h, w):
        return torch.log_softmax(h @ w.t() / temperature, -1).gather(-1, tokens[:, None]).squeeze(-1)

    fused = run(lambda h, w: target_logprobs_from_hidden(h, w, tokens, temperature, onednn))
    for a, b in zip(fused, run(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    not (onednn_available() and bf16_products.has_bf16_products()),
    reason="this CPU has no bf16 instructions (avx512_bf16, amx_bf16) or this torch build no oneDNN",
)
@pytest.mark.parametrize(("chunk", "kept"), [(256, 4), (3, 4), (3, 2), (2, 3)])  # one group; 2 or 4 groups
@pytest.mark.parametrize("weight_grad", ["returned", "into .grad", "added to .grad"])
def test_bf16_head_gradients_are_the_autocast_products(monkeypatch, chunk, kept, weight_grad):
    """Under bf16 products the head's backward rounds each logit gradient once and runs the weight gradient's
    product over groups of ``KEPT_CHUNKS`` chunks: the result is the bf16 products of autocast's arithmetic
    (PyTorch's own bf16 matmuls over full logits), to bf16 rounding, and not the fp32 one in disguise."""
    monkeypatch.setattr(lm_head, "CHUNK_POSITIONS", chunk)
    monkeypatch.setattr(lm_head, "KEPT_CHUNKS", kept)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(11, 32, generator=gen)
    weight = torch.randn(500, 32, generator=gen) / 4
    tokens = torch.randint(0, 500, (11,), generator=gen)
    upstream = torch.randn(11, generator=gen)

    def run(fn, bf16):
        h, w = hidden.clone().requires_grad_(True), torch.nn.Parameter(weight.clone())
        if weight_grad == "added to .grad":
            w.grad = torch.ones_like(w)  # a gradient already there is added to, in fp32
        in_place = gradients_in_place() if weight_grad != "returned" else contextlib.nullcontext()
        with bf16_products.bf16_products() if bf16 else contextlib.nullcontext(), in_place:
            out = fn(h, w)
            (out * upstream).sum().backward()
        return out.detach(), h.grad, w.grad

    def autocast(h, w):
        logits = torch.nn.functional.linear(h.bfloat16(), w.bfloat16()).float()
        return torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)

    fused = run(lambda h, w: target_logprobs_from_hidden(h, w, tokens, 1.0, True), True)
    exact = run(lambda h, w: target_logprobs_from_hidden(h, w, tokens, 1.0, True), False)
    for got, want, full in zip(fused, run(autocast, False), exact, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        rel = (got - full).norm() / full.norm()
        assert 1e-5 < rel < 2e-2


@pytest.mark.parametrize(("chunk", "kept"), [(256, 4), (3, 4), (3, 2)])
def test_a_second_backward_pass_makes_the_kept_logits_again(monkeypatch, chunk, kept):
    """The first backward pass turns the kept chunks' logits into their gradient in place; a second one
    (``retain_graph``) must recompute them, not reuse the overwritten tensors."""
    monkeypatch.setattr(lm_head, "CHUNK_POSITIONS", chunk)
    monkeypatch.setattr(lm_head, "KEPT_CHUNKS", kept)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 16, generator=gen, requires_grad=True)
    weight = torch.randn(300, 16, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 300, (10,), generator=gen)
    loss = target_logprobs_from_hidden(hidden, weight, tokens, 0.7).sum()
    first = torch.autograd.grad(loss, [hidden, weight], retain_graph=True)
    second = torch.autograd.grad(loss, [hidden, weight])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


def test_head_for_fuses_plain_heads_and_falls_back_otherwise():
    from peft import LoraConfig, get_peft_model

    assert isinstance(head_for(load_model("tiny-random")), FusedHead)
    assert not head_for(load_model("tiny-random", onednn=False)).onednn  # the head's kernels follow its layer
    assert head_for(load_model("tiny-random", onednn=True)).onednn == onednn_available()
    body_lora = get_peft_model(load_model("tiny-random"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(head_for(body_lora), FusedHead)
    head_lora = get_peft_model(load_model("tiny-random"), LoraConfig(r=2, target_modules=["lm_head"]))
    assert isinstance(head_for(head_lora), LogitsHead)
    other = load_model("tiny-random")
    other.config.model_type = "gemma2"  # soft-capped logits: the model's own forward must compute them
    assert isinstance(head_for(other), LogitsHead)


def test_training_logprobs_through_either_head_agree_with_gradients(monkeypatch):
    model = load_model("tiny-random")
    gen = torch.Generator().manual_seed(3)
    c1, c2 = (torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (6, 4))
    contexts = [c1, c1, c2, c2]
    targets = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 2, 7, 3)]
    results = []
    for head in ("fused", "logits"):
        if head == "logits":
            monkeypatch.setattr("incentive.logprobs.head_for", LogitsHead)
        model.zero_grad()
        lps = _shared_context_logprobs(model, contexts, targets, [0, 1, 2, 3], 0.8)
        sum((lp * (k + 1)).sum() for k, lp in enumerate(lps)).backward()
        results.append(
            ([lp.detach() for lp in lps], {n: p.grad.clone() for n, p in model.named_parameters()})
        )
    (lp_a, g_a), (lp_b, g_b) = results
    for a, b in zip(lp_a, lp_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-3, atol=1e-5)
