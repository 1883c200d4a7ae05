"""Activations remade in the backward pass instead of kept (:mod:`incentive.models.lean_saves`), and the packed
body's use of them: gradients equal bit for bit, marked tensors not kept, each remade once."""

import functools
import gc
import weakref
from contextlib import nullcontext

import pytest
import torch

from incentive.models import fused_mlp, fused_norm, lean_saves, packed_body
from incentive.models.bf16_products import bf16_products, has_bf16_products
from incentive.models.lean_saves import derived, remade
from incentive.models.onednn import onednn_available


def counted(make, calls):
    def run():
        calls.append(1)
        return make()

    return run


def sin_then_two_products(lean: bool, calls: list) -> tuple[list[torch.Tensor], weakref.ref]:
    """Gradients of a loss whose two products both save ``sin(x)`` (sin keeps x, not its output), and a weak
    reference to ``sin(x)`` taken once the forward pass is done."""
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(*s, generator=gen, requires_grad=True) for s in ((5, 4), (3, 4), (2, 4)))
    with lean_saves.lean_saves() if lean else nullcontext():
        h = remade(torch.sin(x), counted(functools.partial(torch.sin, x), calls))
        y = (h @ w1.t()).sum() + (h @ w2.t()).square().sum()
    kept = weakref.ref(h)
    del h
    gc.collect()
    alive = kept() is not None
    y.backward()
    return [x.grad, w1.grad, w2.grad], alive


def test_a_marked_tensor_is_not_kept_and_is_remade_once_for_all_its_saves():
    calls: list = []
    lean_grads, alive = sin_then_two_products(True, calls)
    assert not alive, "autograd kept the marked tensor"
    assert len(calls) == 1, "remade once, though two products saved it"
    kept_calls: list = []
    grads, alive = sin_then_two_products(False, kept_calls)
    assert alive and kept_calls == [], "outside lean_saves nothing is marked"
    assert all(torch.equal(a, b) for a, b in zip(lean_grads, grads, strict=True))


def test_a_tensor_derived_from_a_marked_one_is_remade_from_it():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    results = []
    for lean in (True, False):
        x.grad = w.grad = None
        calls: list = []
        with lean_saves.lean_saves() if lean else nullcontext():
            h = remade(torch.sin(x), counted(functools.partial(torch.sin, x), calls))
            wide = derived(h.to(torch.float64), h, lambda t: t.to(torch.float64))
            y = (wide @ w.t()).square().sum()
        kept = weakref.ref(wide)
        del h, wide
        gc.collect()
        results.append((kept() is not None, len(calls)))
        y.backward()
        results.append((x.grad.clone(), w.grad.clone()))
    (lean_alive, lean_calls), (lean_dx, lean_dw), (alive, n_calls), (dx, dw) = results
    assert not lean_alive and alive
    assert n_calls == 0
    assert torch.equal(lean_dx, dx) and torch.equal(lean_dw, dw)


def test_only_the_live_marked_tensor_is_replaced():
    """A save is replaced only if it is the very tensor marked, not a later one at the same address."""
    with lean_saves.lean_saves():
        gone = torch.ones(2)
        dead = weakref.ref(gone)
        del gone
        live = torch.zeros(2)
        lean_saves._MARKED.get()[id(live)] = (dead, lean_saves._Remade(lambda: torch.full((2,), 7.0)))
        assert lean_saves._pack(live) is live
        marked = remade(torch.ones(3), lambda: torch.ones(3))
        assert isinstance(lean_saves._pack(marked), lean_saves._Remade)
    assert lean_saves._MARKED.get() is None
    assert lean_saves._pack(marked) is marked, "nothing is replaced outside the block"


def test_no_marks_without_gradients():
    with lean_saves.lean_saves(), torch.no_grad():
        t = remade(torch.ones(2), lambda: torch.ones(2))
        assert lean_saves._pack(t) is t


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lora_dropout", [None, 0.0, 0.3])
def test_packed_body_gives_the_same_gradients_bit_for_bit_when_lean(
    linear_backend, kernels, monkeypatch, lora_dropout, precision
):
    """The packed body remakes its two norm outputs, SwiGLU product and attention output (four marks per layer
    and pass, each remade once in the backward pass), and its loss and gradients equal those of the pass that
    keeps them, bit for bit: under each linear backend, kernels on and off, full and LoRA (with dropout, whose
    adapters keep their own dropped-out input), fp32 and bf16 products."""
    from peft import LoraConfig, get_peft_model

    from incentive.logprobs import backward_target_logprobs
    from incentive.models import load_model

    if precision == "bf16" and not (onednn_available() and has_bf16_products()):
        pytest.skip("this CPU has no bf16 instructions (avx512_bf16, amx_bf16) or this torch build no oneDNN")
    model = load_model("tiny-random", onednn=linear_backend == "onednn")
    if lora_dropout is not None:
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=lora_dropout)
        model = get_peft_model(model, config)
    model.train()
    gen = torch.Generator().manual_seed(4)
    c1, c2 = (torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (7, 4))
    targets = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (30, 5, 12, 20, 9)]
    contexts = [c1, c2, c1, c2, c1]
    weights = torch.arange(1.0, 6.0)

    def loss_of(rows, lps):
        return sum(((lp * weights[i]).sum() for i, lp in zip(rows, lps, strict=True)), torch.zeros(()))

    marks, remakes = [], []

    def remade_counting(t, make):
        if lean_saves._MARKED.get() is not None and torch.is_grad_enabled():
            marks.append(1)
        return lean_saves.remade(t, counted(make, remakes))

    for module in (packed_body, fused_mlp, fused_norm):
        monkeypatch.setattr(module, "remade", remade_counting)
    results = []
    for lean in (True, False):
        monkeypatch.setattr(packed_body.PackedBody, "lean", lean)
        model.zero_grad()
        marks.clear()
        remakes.clear()
        torch.manual_seed(0)
        with bf16_products() if precision == "bf16" else nullcontext():
            loss = backward_target_logprobs(model, contexts, targets, range(5), loss_of, 0.7)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss, grads, len(marks), len(remakes)))
    (loss_a, grads_a, marks_a, remakes_a), (loss_b, grads_b, _, remakes_b) = results
    layers = model.config.num_hidden_layers
    assert marks_a >= 4 * layers and marks_a % (4 * layers) == 0
    # A frozen base layer keeps no input and an adapter with dropout keeps its dropped-out one: under LoRA
    # only what an adapter keeps as it is gets remade.
    assert (remakes_a == marks_a) if lora_dropout is None else (remakes_a <= marks_a)
    assert remakes_b == 0
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
