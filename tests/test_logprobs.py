import pytest
import torch

from incentive import logprobs
from incentive.lm_head import head_for
from incentive.logprobs import length_buckets, plan_batches, target_logprobs
from incentive.models.packed_body import PackedBody, PackedRows


def test_batched_logprobs_equal_one_at_a_time(tiny):
    model, _ = tiny
    model.eval()
    gen = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 9, 3, 12)]
    targets = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (4, 1, 6, 0)]
    with torch.no_grad():
        got = target_logprobs(model, contexts, targets, max_tokens=20)
        for c, t, g in zip(contexts, targets, got, strict=True):
            assert g.shape == (len(t),)
            if not t:
                continue
            full = torch.log_softmax(model(torch.tensor([c + t])).logits[0].float(), -1)
            expected = torch.stack([full[len(c) - 1 + j, t[j]] for j in range(len(t))])
            assert torch.allclose(expected, g, atol=1e-5)


def test_plan_batches_respects_budget_keeps_groups_and_covers_all():
    contexts = [[1] * 6, [2] * 3, [1] * 6, [3] * 2, [2] * 3, [1] * 6]
    targets = [[5] * 4, [5] * 2, [5] * 1, [5] * 9, [5] * 3, [5] * 2]
    batches = plan_batches(contexts, targets, max_tokens=20)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        n_ctx = len({tuple(contexts[i]) for i in b})
        cost = n_ctx * max(len(contexts[i]) for i in b) + len(b) * max(len(targets[i]) for i in b)
        assert len(b) == 1 or cost <= 20
    assert [0, 2, 5] in batches  # one prompt's completions share a chunk (and its context computation)


def test_length_buckets_minimise_padding_plus_overhead_by_hand():
    lengths = [10, 64, 12, 60, 11, 63]
    # one bucket: 6*64 + 64 = 448; {10,11,12} {60,63,64}: (3*12 + 64) + (3*64 + 64) = 356; three or more cost more
    assert length_buckets(lengths, overhead=64) == [[0, 4, 2], [3, 5, 1]]
    assert length_buckets(lengths, overhead=1000) == [[0, 4, 2, 3, 5, 1]]
    assert length_buckets(lengths, overhead=0) == [[0], [4], [2], [3], [5], [1]]
    assert length_buckets([], overhead=64) == []
    # at most 128 padded tokens per bucket: {60,63,64} (192) is out; {60} {63,64} costs 60+64 + 128+64 = 316,
    # {60,63} {64} 126+64 + 64+64 = 318, three singles 187 + 3*64 = 379
    assert length_buckets(lengths, overhead=64, max_tokens=128) == [[0, 4, 2], [3], [5, 1]]
    assert length_buckets(lengths, overhead=64, max_tokens=100) == [[0, 4, 2], [3], [5], [1]]
    assert length_buckets([70, 80], overhead=0, max_tokens=50) == [[0], [1]]  # a row alone may exceed it


def test_shared_context_path_matches_whole_rows_with_gradients(tiny_each_backend, linear_backend):
    from peft import LoraConfig, get_peft_model

    from incentive.logprobs import _shared_context_logprobs, _whole_row_logprobs
    from incentive.models import load_model

    tiny = tiny_each_backend
    gen = torch.Generator().manual_seed(1)
    c1, c2 = (
        torch.randint(0, 1000, (7,), generator=gen).tolist(),
        torch.randint(0, 1000, (4,), generator=gen).tolist(),
    )
    contexts = [c1, c2, c1, c2, c1]
    targets = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (3, 5, 1, 0, 4)]
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora_policy = get_peft_model(load_model("tiny-random", onednn=linear_backend == "onednn"), lora)
    for model in (tiny[0], lora_policy):
        results = []
        for fn in (_whole_row_logprobs, _shared_context_logprobs):
            model.zero_grad()
            lps = fn(model, contexts, targets, list(range(5)), 0.7)
            sum((lp * (k + 1)).sum() for k, lp in enumerate(lps)).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((lps, grads))
        (lp_a, g_a), (lp_b, g_b) = results
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(lp_a, lp_b, strict=True))
        assert g_a.keys() == g_b.keys()
        assert all(torch.allclose(g_a[k], g_b[k], atol=1e-4, rtol=1e-4) for k in g_a)


def _padded_or_packed(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, packed: bool) -> None:
    """Targets after a shared context run packed (:mod:`incentive.models.packed_body`) where the model allows,
    as the tiny model does; ``packed=False`` makes them run right-padded in length buckets."""
    assert (PackedBody.for_model(model) is not None) and logprobs._packed_body(
        model, head_for(model)
    ) is not None
    if not packed:
        monkeypatch.setattr(logprobs, "_packed_body", lambda model, head: None)


@pytest.mark.parametrize("packed", [False, True])
def test_scoring_in_length_buckets_matches_whole_rows(tiny_each_backend, kernels, monkeypatch, packed):
    from incentive.logprobs import _shared_context_logprobs, _whole_row_logprobs

    tiny = tiny_each_backend
    gen = torch.Generator().manual_seed(2)
    c1, c2 = (torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (7, 4))
    contexts = [c1, c2, c1, c2, c1]
    targets = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (3, 5, 1, 0, 4)]
    _padded_or_packed(monkeypatch, tiny[0], packed)
    if packed:  # one pass; every length its own attention group
        monkeypatch.setattr(logprobs, "ATTENTION_GROUP_OVERHEAD", 0)
    else:  # every row its own forward on the shared context, last row first
        monkeypatch.setattr(
            logprobs, "length_buckets", lambda lengths, **_: [[k] for k in range(len(lengths))][::-1]
        )
    with torch.no_grad():
        whole = _whole_row_logprobs(tiny[0], contexts, targets, list(range(5)), 0.7)
        bucketed = _shared_context_logprobs(tiny[0], contexts, targets, list(range(5)), 0.7)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(whole, bucketed, strict=True))


@pytest.mark.parametrize("packed", [False, True])
def test_bucketed_backward_matches_whole_rows_in_loss_and_gradients(
    tiny_each_backend, linear_backend, kernels, monkeypatch, packed
):
    """Training's path (one backward pass per length bucket or packed pass, the shared context's KV gradient
    summed and sent back once) gives the loss and gradients of one pass over whole rows, for full and LoRA
    models; packed passes put an empty row and several attention groups in one pass."""
    from peft import LoraConfig, get_peft_model

    from incentive.logprobs import _whole_row_logprobs, backward_target_logprobs
    from incentive.models import load_model

    tiny = tiny_each_backend
    gen = torch.Generator().manual_seed(3)
    c1, c2 = (torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (7, 4))
    contexts = [c1, c2, c1, c2, c1, c2]
    targets = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (3, 5, 1, 0, 4, 2)]
    weights = torch.arange(1.0, 7.0)
    _padded_or_packed(monkeypatch, tiny[0], packed)
    if packed:
        monkeypatch.setattr(logprobs, "PACKED_TRAINING_TOKENS", 5)
        monkeypatch.setattr(logprobs, "ATTENTION_GROUP_OVERHEAD", 0)
        passes = [[3, 2, 5], [0], [4], [1]]  # by length (0, 1, 2 | 3 | 4 | 5), at most 5 tokens a pass
    else:
        passes = [[0, 5], [3, 2], [1, 4]]
        monkeypatch.setattr(logprobs, "length_buckets", lambda lengths, **_: passes)
    seen: list[list[int]] = []

    def loss_of(rows: list[int], lps: list[torch.Tensor]) -> torch.Tensor:
        seen.append(rows)
        return sum(((lp * weights[i]).sum() for i, lp in zip(rows, lps, strict=True)), torch.zeros(()))

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora_policy = get_peft_model(load_model("tiny-random", onednn=linear_backend == "onednn"), lora)
    for model in (tiny[0], lora_policy):
        model.zero_grad()
        lps = _whole_row_logprobs(model, contexts, targets, list(range(6)), 0.7)
        expected = loss_of(list(range(6)), lps)
        expected.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        seen.clear()
        got = backward_target_logprobs(model, contexts, targets, list(range(6)), loss_of, 0.7)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert seen == passes
        assert abs(got - float(expected.detach())) < 1e-4
        assert grads.keys() == want.keys()
        assert all(torch.allclose(grads[k], want[k], atol=1e-4, rtol=1e-4) for k in want)


@pytest.mark.parametrize("packed", [False, True])
def test_shared_context_gradients_are_bit_reproducible(tiny, monkeypatch, packed):
    """Rows pick their shared context's KV cache with ``index_select``: ``t[rows]``'s backward sums the rows of
    a context with atomic adds on several threads once a tensor is large (here 8 rows x 2 heads x 400
    positions x 16), so three or more rows of a context in one bucket summed in a different order now and
    then; ``index_select``'s backward sums them in a fixed order. Packed passes pick the context and the
    padded slots of each attention group the same way."""
    from incentive.logprobs import backward_target_logprobs, length_buckets

    model = tiny[0]
    _padded_or_packed(monkeypatch, model, packed)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 1000, (400,), generator=gen).tolist() for _ in range(2)]
    contexts = [p for p in prompts for _ in range(8)]
    # close lengths: two buckets of 8 rows, 4 of each context, spread over both threads' halves
    targets = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in range(10, 18)] * 2
    assert [len(b) for b in length_buckets([len(t) for t in targets], max_tokens=256)] == [8, 8]
    seen = set()
    for _ in range(30):
        model.zero_grad()
        backward_target_logprobs(
            model, contexts, targets, range(16), lambda rows, lps: sum(lp.sum() for lp in lps)
        )
        seen.add(b"".join(p.grad.numpy().tobytes() for p in model.parameters() if p.grad is not None))
    model.zero_grad()
    assert len(seen) == 1


def test_packed_passes_fill_up_in_order_of_length():
    context = logprobs._SharedContext.__new__(logprobs._SharedContext)
    context.packed = object()  # any packed body: passes only look at whether there is one
    lengths = [5, 2, 9, 0, 3, 4]
    assert context.passes(lengths, 9) == [[3, 1, 4, 5], [0], [2]]  # 0+2+3+4 = 9, then 5, then 9
    assert context.passes(lengths, 4) == [[3, 1], [4], [5], [0], [2]]  # a row over the cap goes alone
    assert context.passes(lengths, None) == [[3, 1, 4, 5, 0, 2]]
    assert context.passes([], 8) == []


def test_packed_rows_layout_by_hand():
    """Two rows (lengths 2 and 3) after contexts 1 and 0 of a left-padded [2 contexts, 3] mask, in one group of
    width 3: ``slots`` places each packed token in the padded rows, and the mask shows the row's context then
    causal positions."""
    context_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    rows = PackedRows.build([[7, 8], [4, 5, 6]], [3, 2], [1, 0], context_mask, [2])
    assert rows.ids.tolist() == [7, 8, 4, 5, 6]
    assert rows.positions.tolist() == [3, 4, 2, 3, 4]
    (group,) = rows.groups
    assert group.width == 3 and group.owner.tolist() == [1, 0] and group.tokens == slice(0, 5)
    assert group.slots.tolist() == [0, 1, 3, 4, 5]
    assert group.mask.shape == (2, 1, 3, 6)
    assert group.mask[0, 0].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert group.mask[1, 0].int().tolist() == [[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    split = PackedRows.build([[7, 8], [4, 5, 6]], [3, 2], [1, 0], context_mask, [1, 1])
    assert [(g.width, g.tokens, g.slots.tolist()) for g in split.groups] == [
        (2, slice(0, 2), [0, 1]),
        (3, slice(2, 5), [0, 1, 2]),
    ]
    with pytest.raises(ValueError, match="at least one target token"):
        PackedRows.build([[7], []], [3, 2], [1, 0], context_mask, [2])
    with pytest.raises(ValueError, match="do not cover 2 rows"):
        PackedRows.build([[7], [8]], [3, 2], [1, 0], context_mask, [1])


def test_packed_body_only_for_plain_llama_family_without_attention_dropout_or_checkpointing():
    from incentive.models import load_model

    model = load_model("tiny-random")
    assert PackedBody.for_model(model) is not None
    model.config.attention_dropout = 0.1
    assert PackedBody.for_model(model) is None
    model.config.attention_dropout = 0.0
    model.gradient_checkpointing_enable()
    assert PackedBody.for_model(model) is None
    model.gradient_checkpointing_disable()
    assert PackedBody.for_model(model) is not None
    model.config._attn_implementation = "eager"
    assert PackedBody.for_model(model) is None


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_packed_path_equals_padded_for_the_other_llama_families(monkeypatch, family):
    """Qwen2 (biased q/k/v) and Mistral run packed too: loss and gradients equal the padded buckets' path."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    from incentive.logprobs import backward_target_logprobs

    sizes = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
    if family == "qwen2":
        config = Qwen2Config(**sizes, **heads)
    else:
        config = MistralConfig(**sizes, **heads, sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert PackedBody.for_model(model) is not None
    gen = torch.Generator().manual_seed(5)
    c1, c2 = (torch.randint(0, 300, (n,), generator=gen).tolist() for n in (6, 3))
    contexts = [c1, c2, c1, c2]
    targets = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (4, 2, 5, 1)]
    results = []
    for packed in (True, False):
        if not packed:
            monkeypatch.setattr(logprobs, "_packed_body", lambda model, head: None)
        model.zero_grad()
        loss = backward_target_logprobs(
            model,
            contexts,
            targets,
            range(4),
            lambda rows, lps: sum((lp * (1 + r)).sum() for r, lp in zip(rows, lps, strict=True)),
        )
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (packed_loss, packed_grads), (padded_loss, padded_grads) = results
    assert abs(packed_loss - padded_loss) < 1e-4
    assert packed_grads.keys() == padded_grads.keys()
    assert all(torch.allclose(packed_grads[k], padded_grads[k], atol=1e-5, rtol=1e-4) for k in padded_grads)


def test_shared_prefixes_by_hand():
    from incentive.logprobs import shared_prefixes

    system = list(range(40))
    prompts = [system + [100 + p] * 36 for p in range(3)]
    # 3 prompts x 3 completions' reasoning: each prompt's rows share 76 tokens, all rows share 40. One cluster per
    # prompt saves 3 x (2 x 76 - 16) = 408 tokens, one cluster of all saves 8 x 40 - 16 = 304.
    contexts = [prompt + [200 + g] * (g + 1) for prompt in prompts for g in range(3)]
    assert shared_prefixes(contexts) == [76] * 9
    assert shared_prefixes(contexts[::-1]) == [76] * 9  # order does not matter
    # identical contexts share all of themselves: nothing to split
    assert shared_prefixes([prompts[0]] * 2 + [prompts[1]] * 2) == [76] * 4
    # an overlap of 10 saves less than a cluster costs (16): every context alone, whole
    assert shared_prefixes([list(range(20)), [*range(10), *[99] * 10], [5] * 30]) == [20, 20, 30]
    # a context that is the others' common prefix shares all of itself
    assert shared_prefixes([prompts[0], prompts[0] + [7, 8], prompts[0] + [9]]) == [76] * 3
    assert shared_prefixes([]) == []
    assert shared_prefixes([[1, 2, 3]]) == [3]


def test_contexts_sharing_a_prefix_score_as_whole_rows(tiny, monkeypatch):
    """Gradient-free scoring runs each prompt once and every row's own rest packed after it (NOVER's contexts:
    prompt + reasoning); logprobs equal whole-row scoring, including an empty reasoning, an empty target and a
    context that shares nothing."""
    from incentive.logprobs import _whole_row_logprobs

    model = tiny[0]
    model.eval()
    gen = torch.Generator().manual_seed(5)
    system = torch.randint(0, 1000, (20,), generator=gen).tolist()
    prompts = [system + torch.randint(0, 1000, (18,), generator=gen).tolist() for _ in range(3)]
    contexts, targets = [], []
    for p, prompt in enumerate(prompts):
        for g in range(3):
            contexts.append(prompt + torch.randint(0, 1000, (2 * g + p,), generator=gen).tolist())
            targets.append(torch.randint(0, 1000, (3 + g,), generator=gen).tolist())
    targets[4] = []
    contexts.append(torch.randint(0, 1000, (25,), generator=gen).tolist())
    targets.append(torch.randint(0, 1000, (4,), generator=gen).tolist())
    seen = []
    forward = logprobs.forward_target_logprobs

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("scored"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(logprobs, "forward_target_logprobs", spy)
    with torch.no_grad():
        whole = _whole_row_logprobs(model, contexts, targets, list(range(len(contexts))), 1.0)
        shared = target_logprobs(model, contexts, targets)
    assert seen and all(s == [len(t) for t in targets] for s in seen)  # the split path ran
    assert [len(x) for x in shared] == [len(t) for t in targets]
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(whole, shared, strict=True))

    seen.clear()  # with gradient (training), contexts are never split
    target_logprobs(model, contexts, targets)
    assert seen and all(s is None for s in seen)

    seen.clear()  # nor where the packed body cannot run the rests
    monkeypatch.setattr(logprobs, "_packed_body", lambda model, head: None)
    with torch.no_grad():
        padded = target_logprobs(model, contexts, targets)
    assert seen and all(s is None for s in seen)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(whole, padded, strict=True))


@pytest.mark.parametrize("lora_dropout", [None, 0.0, 0.3])
def test_recomputed_layers_give_the_same_loss_and_gradients(linear_backend, lora_dropout):
    """With the packed body recomputing its layers (``model.activation_checkpointing``) the loss and
    gradients equal those of a pass that keeps every activation (LoRA with dropout too: the recompute draws
    the same masks), each layer runs twice per pass, and rows with distinct contexts run in passes too (which
    draws other dropout masks than one whole-row pass, so that case is compared without dropout)."""
    from peft import LoraConfig, get_peft_model

    from incentive.logprobs import backward_target_logprobs
    from incentive.models import load_model
    from incentive.models.packed_body import recompute_layers, recomputes_layers

    model = load_model("tiny-random", onednn=linear_backend == "onednn")
    lora = lora_dropout is not None
    if lora:
        config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], lora_dropout=lora_dropout, init_lora_weights=False
        )
        model = get_peft_model(model, config)
    model.train()
    gen = torch.Generator().manual_seed(4)
    c1, c2, c3 = (torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (7, 4, 5))
    targets = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (30, 5, 12, 20, 9)]
    weights = torch.arange(1.0, 6.0)

    def loss_of(rows, lps):
        return sum(((lp * weights[i]).sum() for i, lp in zip(rows, lps, strict=True)), torch.zeros(()))

    body = model.get_base_model().model if lora else model.model
    calls = []
    body.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    shared, distinct = [c1, c2, c1, c2, c1], [c1, c2, c3, c3[:3], c1[:6]]
    for contexts in [shared] if lora_dropout else [shared, distinct]:
        results = []
        for recompute in (False, True):
            recompute_layers(model, recompute)
            assert recomputes_layers(model) == recompute
            model.zero_grad()
            calls.clear()
            torch.manual_seed(0)
            loss = backward_target_logprobs(model, contexts, targets, range(5), loss_of, 0.7)
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((loss, grads, len(calls)))
        (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
        assert loss_a == pytest.approx(loss_b, rel=1e-6)
        assert grads_a.keys() == grads_b.keys()
        assert all(torch.allclose(grads_a[k], grads_b[k], atol=1e-5, rtol=1e-5) for k in grads_a)
        assert calls_b > calls_a, "each layer runs again in the backward pass"
    recompute_layers(model, False)


def test_activation_checkpointing_is_refused_where_the_packed_body_cannot_run():
    from incentive.config import ConfigError, ModelConfig
    from incentive.models import load_model
    from incentive.models.packed_body import recompute_layers
    from incentive.training.policy import build_policy

    model = load_model("tiny-random")
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="activation checkpointing needs a Llama, Mistral or Qwen2 model"):
        recompute_layers(model)
    assert build_policy(ModelConfig(name="tiny-random", activation_checkpointing=True)) is not None
    with pytest.raises(ConfigError, match="model.activation_checkpointing"):
        import incentive.training.policy as policy

        original = policy.recompute_layers
        policy.recompute_layers = lambda m: recompute_layers(model)
        try:
            build_policy(ModelConfig(name="tiny-random", activation_checkpointing=True))
        finally:
            policy.recompute_layers = original


@pytest.mark.parametrize("prefill", [False, True])
def test_shared_contexts_go_back_one_layer_at_a_time(tiny_each_backend, prefill):
    """After the targets' passes the contexts' layers run again one at a time from the top, each one's
    backward pass before the next one down is made, so only one layer's activations are alive; they start
    from the layer inputs that the contexts' first run (the update's own, or the engine's prefill) recorded,
    so the contexts run no second forward of all their layers."""
    from incentive.engines import ENGINES, SamplingParams
    from incentive.logprobs import backward_target_logprobs

    model, tokenizer = tiny_each_backend
    gen = torch.Generator().manual_seed(5)
    c1, c2 = (torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (9, 6))
    contexts = [c1, c2, c1, c2]
    targets = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (4, 3, 5, 2)]
    prefilled = None
    if prefill:
        engine = ENGINES.get("cached")(model, tokenizer)
        engine.decode([c1, c2], SamplingParams(n=1, max_new_tokens=2, temperature=0.0))
        prefilled = engine.prefilled
    events: list[tuple[str, int]] = []

    def forward(index: int) -> None:
        events.append(("forward" if torch.is_grad_enabled() else "no-grad", index))

    handles = []
    for index, layer in enumerate(model.model.layers):
        projection = layer.self_attn.q_proj
        handles += [
            projection.register_forward_pre_hook(lambda *_, i=index: forward(i)),
            projection.register_full_backward_hook(lambda *_, i=index: events.append(("backward", i))),
        ]
    model.zero_grad()
    try:
        loss_of = lambda rows, lps: sum(lp.sum() for lp in lps)  # noqa: E731
        backward_target_logprobs(model, contexts, targets, range(4), loss_of, prefilled=prefilled)
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad()
    layers = range(len(model.model.layers))
    first_run = [] if prefill else [("no-grad", i) for i in layers]
    targets_pass = [("forward", i) for i in layers] + [("backward", i) for i in reversed(layers)]
    contexts_back = [event for i in reversed(layers) for event in (("forward", i), ("backward", i))]
    assert events == first_run + targets_pass + contexts_back
