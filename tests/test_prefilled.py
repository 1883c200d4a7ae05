"""The engine's prompt prefills reused by the update: the same keys, values and states the update would make,
taken only while the weights are the ones they were made with."""

import torch

from incentive.engines import ENGINES, SamplingParams
from incentive.engines.prefilled import PrefilledPrompts, weights_version
from incentive.lm_head import head_for
from incentive.logprobs import _SharedContext, backward_target_logprobs, left_padded
from incentive.models.packed_body import PackedBody


def _contexts(n: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 1000, (k,), generator=gen).tolist() for k in (9, 5, 7)[:n]]


def _prefill(model, tokenizer, contexts, **engine_args):
    engine = ENGINES.get("cached")(model, tokenizer, **engine_args)
    engine.decode(contexts, SamplingParams(n=2, max_new_tokens=3, temperature=0.0))
    return engine


def _computed(model, contexts):
    head = head_for(model)
    with torch.no_grad():
        packed = PackedBody.for_model(model)
        ctx = _SharedContext(head, contexts, range(len(contexts)), packed=packed, record=True)
    return ctx.cache, ctx.last, ctx.inputs


def test_taken_prefill_equals_what_the_update_computes(tiny):
    """All prompts, a subset whose longest is shorter than the prefill's (the padding columns go), and another
    order: keys, values, last states and the layers' inputs at the real tokens equal the update's own run of
    those prompts."""
    model, tokenizer = tiny
    contexts = _contexts()
    engine = _prefill(model, tokenizer, contexts)
    for wanted in (contexts, [contexts[2], contexts[1]], [contexts[1]]):
        order = [tuple(c) for c in wanted]
        cache, last, inputs = engine.prefilled.take(model, order)
        want_cache, want_last, want_inputs = _computed(model, wanted)
        torch.testing.assert_close(last, want_last, rtol=1e-5, atol=1e-5)
        real = left_padded(wanted)[1].bool()
        assert len(inputs) == len(want_inputs) == len(model.model.layers)
        for got, want in zip(inputs, want_inputs, strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        for layer, want in zip(cache.layers, want_cache.layers, strict=True):
            assert layer.keys.shape == want.keys.shape
            torch.testing.assert_close(layer.keys, want.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.values, want.values, rtol=1e-5, atol=1e-5)
    assert engine.prefilled.take(model, [(1, 2, 3)]) is None  # a prompt it never saw


def test_nothing_is_taken_once_the_weights_change(tiny):
    model, tokenizer = tiny
    contexts = _contexts()
    engine = _prefill(model, tokenizer, contexts)
    order = [tuple(c) for c in contexts]
    assert engine.prefilled.take(model, order) is not None
    engine.weights_changed()  # the trainer's call after an optimizer step drops them at once
    assert engine.prefilled.entries == []
    engine = _prefill(model, tokenizer, contexts)
    before = weights_version(model)
    weight = next(p for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        weight.add_(0.0)  # any in-place write, as an optimizer step or a checkpoint load does
    assert weights_version(model) != before
    assert engine.prefilled.take(model, order) is None
    other = ENGINES.get("cached")(model, tokenizer)
    assert other.prefilled.take(model, order) is None
    _prefill(model, tokenizer, contexts[:1])
    assert engine.prefilled.take(torch.nn.Linear(2, 2), order) is None  # another model


def test_kept_only_within_budget_for_fp32_policies_without_dropout(tiny):
    model, tokenizer = tiny
    contexts = _contexts()
    order = [tuple(c) for c in contexts]
    small = ENGINES.get("cached")(model, tokenizer)
    small.prefilled = PrefilledPrompts(model, max_bytes=1000)
    small.decode(contexts, SamplingParams(n=1, max_new_tokens=2, temperature=0.0))
    assert small.prefilled.entries == []
    bf16 = _prefill(model, tokenizer, contexts, sampling_dtype=torch.bfloat16)
    assert bf16.prefilled.take(model, order) is None
    dropout = PrefilledPrompts(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    ids, mask, positions = left_padded(contexts)
    cache, last, _ = _computed(model, contexts)
    dropout.put(contexts, cache, last)
    assert dropout.entries == []


def test_update_gradients_equal_with_and_without_the_prefill(tiny_each_backend, kernels):
    """backward_target_logprobs taking the engine's prefill gives the loss and gradients of its own run."""
    model, tokenizer = tiny_each_backend
    contexts = _contexts(2)
    gen = torch.Generator().manual_seed(2)
    rows = [contexts[0], contexts[1], contexts[0], contexts[1]]
    targets = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (4, 2, 6, 3)]
    engine = _prefill(model, tokenizer, contexts)

    def loss_of(indices, lps):
        return sum(((lp * (i + 1)).sum() for i, lp in zip(indices, lps, strict=True)), torch.zeros(()))

    taken = []
    original = engine.prefilled.take

    def spy(model_, order):
        taken.append(original(model_, order) is not None)
        return original(model_, order)

    engine.prefilled.take = spy
    results = []
    for prefilled in (None, engine.prefilled):
        model.zero_grad()
        loss = backward_target_logprobs(model, rows, targets, range(4), loss_of, 0.8, prefilled)
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    model.zero_grad()
    assert taken == [True]
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-4
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[k], grads_b[k], atol=1e-5, rtol=1e-4) for k in grads_a)


def test_a_lora_policy_takes_its_merged_prefill(tiny):
    """Sampling merges the adapter and switches it off (peft then freezes the adapter's parameters): the
    prefill still belongs to the policy's weights and equals the update's own run to fp32 rounding."""
    from peft import LoraConfig, get_peft_model

    from incentive.models import load_model
    from tests.test_engines import prompts_for

    tokenizer = tiny[1]
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    policy = get_peft_model(load_model("tiny-random"), lora)
    examples, prompts = prompts_for(tokenizer, n=2)
    engine = ENGINES.get("cached")(policy, tokenizer)
    engine.generate(examples, prompts, [0, 1], SamplingParams(n=2, max_new_tokens=3, temperature=0.0))
    order = [tuple(engine.encode(p)) for p in prompts]
    kept = engine.prefilled.take(policy, order)
    assert kept is not None and engine.prefilled.version is None
    want_cache, want_last, _ = _computed(policy, [list(c) for c in order])
    torch.testing.assert_close(kept[1], want_last, rtol=1e-4, atol=1e-5)
    for layer, want in zip(kept[0].layers, want_cache.layers, strict=True):
        torch.testing.assert_close(layer.keys, want.keys, rtol=1e-4, atol=1e-5)
