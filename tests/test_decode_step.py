"""The lean decode step gives the model's own logits (bit for bit with the kernels off, to fp32 rounding with
them) and is used only where it can."""

import pytest
import torch

from incentive.engines.decode_step import DecodeStep, plain_linear
from incentive.engines.kv import preallocate
from incentive.kernels import build
from incentive.logprobs import left_padded


def _prefilled(model, contexts):
    ids, mask, positions = left_padded(contexts)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    rows = torch.arange(len(contexts))
    return preallocate(out.cache, rows, 4), mask, torch.tensor([len(c) for c in contexts])


@torch.no_grad()
def test_decode_step_logits_equal_the_model_forward_over_several_steps(tiny_each_backend, kernels):
    """Left padding (contexts of 5, 9 and 9 tokens) and three steps in a row, each on its own cache."""
    kernel = kernels
    model = tiny_each_backend[0]
    step = DecodeStep.for_model(model)
    assert step is not None
    contexts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [19, 20, 21, 22, 23, 24, 25, 26, 27]]
    ours, mask, positions = _prefilled(model, contexts)
    theirs, _, _ = _prefilled(model, contexts)
    tokens = torch.tensor([30, 31, 32])
    for _ in range(3):
        mask = torch.cat([mask, mask.new_ones(len(contexts), 1)], dim=1)
        got = step(tokens, positions, mask, ours)
        want = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            cache=theirs,
            use_cache=True,
        ).logits[:, -1]
        if kernel:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want)
        tokens, positions = got.argmax(-1), positions + 1


def test_decode_step_is_only_for_plain_full_attention_models(tiny):
    model = tiny[0]
    assert DecodeStep.for_model(model) is not None
    config = model.config
    original = config._attn_implementation
    try:
        config._attn_implementation = "eager"
        assert DecodeStep.for_model(model) is None, "eager attention rounds differently: the model's forward"
    finally:
        config._attn_implementation = original
    config.sliding_window = 4
    try:
        assert DecodeStep.for_model(model) is None, "a sliding window masks what the step would not"
    finally:
        del config.sliding_window
    assert DecodeStep.for_model(torch.nn.Linear(2, 2)) is None


def test_products_go_to_the_kernel_only_where_one_linear_computes_the_output(tiny_each_backend, linear_backend):
    """Plain layers (either backend) and LoRA layers with the adapter merged or switched off; an active adapter
    runs peft; a subclass that computes something else is not plain."""
    from peft import LoraConfig, get_peft_model

    from incentive.models import load_model

    q = tiny_each_backend[0].model.layers[0].self_attn.q_proj
    assert plain_linear(q) is q
    assert plain_linear(torch.nn.LayerNorm(4)) is None

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert plain_linear(Scaled(2, 2)) is None
    base = load_model("tiny-random", onednn=linear_backend == "onednn")
    policy = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    assert plain_linear(layer) is None, "active adapter: its product must be added"
    with policy.disable_adapter():
        assert plain_linear(layer) is layer.get_base_layer()
    layer.merge()
    assert plain_linear(layer) is layer.get_base_layer()


@torch.no_grad()
def test_each_product_runs_the_small_row_kernel_where_it_applies_else_the_layer(
    tiny_each_backend, kernels, monkeypatch
):
    """Op by op, every projection of the step (q/k/v, o, gate/up, down per layer, and the head) goes to the
    small-row kernel with the kernels on, on either backend; with them off (or above its row limit) the layers
    themselves run, so a oneDNN layer keeps oneDNN."""
    from incentive.kernels import small_rows

    model = tiny_each_backend[0]
    step = DecodeStep.for_model(model)
    for layer in step.layers:
        layer.fused = None
    calls = []
    kernel_cat = small_rows.linear_cat
    monkeypatch.setattr(small_rows, "linear_cat", lambda *a: calls.append(len(a[1])) or kernel_cat(*a))
    layer_calls = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda *_: layer_calls.append(1))
    try:
        contexts = [[5, 6, 7, 8, 9], [10, 11, 12]]
        cache, mask, positions = _prefilled(model, contexts)
        layer_calls.clear()
        mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
        step(torch.tensor([30, 31]), positions, mask, cache)
    finally:
        for module in model.modules():
            module._forward_hooks.clear()
    layers = len(step.layers)
    if kernels:
        assert calls == [3, 1, 2, 1] * layers + [1] and not layer_calls
    else:
        assert not calls and len(layer_calls) == 7 * layers + 1


@torch.no_grad()
def test_decode_step_of_a_lora_policy_samples_from_the_merged_weights(linear_backend, kernels):
    """Inside ``merged_lora`` the step's products read the merged weights (kernel or not), so its logits are
    those of the policy with its adapter active."""
    from peft import LoraConfig, get_peft_model

    from incentive.engines.merged import merged_lora
    from incentive.models import load_model

    torch.manual_seed(0)
    policy = get_peft_model(
        load_model("tiny-random", onednn=linear_backend == "onednn"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"]),
    )
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    policy.eval()
    contexts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]
    ours, mask, positions = _prefilled(policy, contexts)
    theirs, _, _ = _prefilled(policy, contexts)
    tokens = torch.tensor([30, 31])
    mask = torch.cat([mask, mask.new_ones(len(contexts), 1)], dim=1)
    want = policy(
        input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None], cache=theirs
    ).logits[:, -1]
    with merged_lora(policy):
        got = DecodeStep.for_model(policy)(tokens, positions, mask, ours)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with policy.disable_adapter():
        plain, _, _ = _prefilled(policy, contexts)
        base = DecodeStep.for_model(policy)(tokens, positions, mask, plain)
    assert not torch.allclose(got, base, atol=1e-3), "the adapter must matter"


@torch.no_grad()
def test_one_kernel_per_layer_equals_the_op_by_op_step(tiny_each_backend):
    """The fused layer (norms, rotary, cache write, attention, residuals, activation in one op) gives the
    op-by-op step's logits and cache contents to fp32 rounding, over several steps with left padding."""
    if build.kernel_ops() is None:
        pytest.skip(f"kernels unavailable: {build.unavailable_reason()}")
    model = tiny_each_backend[0]
    fused, op_by_op = DecodeStep.for_model(model), DecodeStep.for_model(model)
    assert all(layer.fused is not None for layer in fused.layers)
    for layer in op_by_op.layers:
        layer.fused = None
    contexts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    ours, mask, positions = _prefilled(model, contexts)
    theirs, _, _ = _prefilled(model, contexts)
    tokens = torch.tensor([30, 31])
    for _ in range(4):
        mask = torch.cat([mask, mask.new_ones(len(contexts), 1)], dim=1)
        got = fused(tokens, positions, mask, ours)
        want = op_by_op(tokens, positions, mask, theirs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tokens, positions = got.argmax(-1), positions + 1
    for a, b in zip(ours.layers, theirs.layers, strict=True):
        assert a.length == b.length == 13
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="KV cache full"):
        mask = torch.cat([mask, mask.new_ones(len(contexts), 1)], dim=1)
        fused(tokens, positions, mask, ours)


@torch.no_grad()
def test_one_kernel_per_layer_up_to_its_row_limit_then_op_by_op(tiny_each_backend, monkeypatch):
    """The fused layer runs batches of up to ``FUSED_MAX_ROWS`` rows, on either linear backend; above that the
    layers run op by op, with the same logits to fp32 rounding."""
    if build.kernel_ops() is None:
        pytest.skip(f"kernels unavailable: {build.unavailable_reason()}")
    from incentive.engines import decode_step

    model = tiny_each_backend[0]
    monkeypatch.setattr(decode_step, "FUSED_MAX_ROWS", 2)
    calls = []
    fused_call = decode_step._FusedLayer.__call__
    monkeypatch.setattr(decode_step._FusedLayer, "__call__", lambda *a: calls.append(1) or fused_call(*a))
    step = DecodeStep.for_model(model)
    logits = {}
    for contexts in ([[5, 6, 7], [8, 9]], [[5, 6, 7], [8, 9], [10, 11, 12, 13]]):
        calls.clear()
        cache, mask, positions = _prefilled(model, contexts)
        mask = torch.cat([mask, mask.new_ones(len(contexts), 1)], dim=1)
        logits[len(contexts)] = step(torch.arange(30, 30 + len(contexts)), positions, mask, cache)
        assert len(calls) == (len(step.layers) if len(contexts) <= 2 else 0)
    torch.testing.assert_close(logits[3][:2], logits[2], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_rows_leave_the_batch_without_copying_the_cache(tiny_each_backend):
    """Rows that finish are dropped by index (no copy of any layer's buffers) on the fused path and by copying
    on the op-by-op path: the same logits and cache contents, in the new row order; the next op-by-op update
    makes the buffers compact again."""
    if build.kernel_ops() is None:
        pytest.skip(f"kernels unavailable: {build.unavailable_reason()}")
    model = tiny_each_backend[0]
    fused, op_by_op = DecodeStep.for_model(model), DecodeStep.for_model(model)
    assert all(layer.fused is not None for layer in fused.layers)
    for layer in op_by_op.layers:
        layer.fused = None
    contexts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [19, 20, 21], [22, 23, 24, 25]]
    ours, mask, positions = _prefilled(model, contexts)
    theirs, _, _ = _prefilled(model, contexts)
    buffers = [layer.key_buffer for layer in ours.layers]
    tokens = torch.tensor([30, 31, 32, 33])
    for keep in (None, torch.tensor([3, 1, 0]), torch.tensor([2, 0])):
        if keep is not None:
            ours.batch_select_indices(keep)
            theirs.batch_select_indices(keep)
            tokens, positions, mask = tokens[keep], positions[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)
        got = fused(tokens, positions, mask, ours)
        want = op_by_op(tokens, positions, mask, theirs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tokens, positions = got.argmax(-1), positions + 1
    assert all(a.key_buffer is b for a, b in zip(ours.layers, buffers, strict=True))  # never copied
    assert ours.layers[0].rows.tolist() == [0, 3] and ours.layers[0].keys is None
    for a, b in zip(ours.layers, theirs.layers, strict=True):
        a._compact()
        assert a.rows is None and a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)
    ours.layers[0].rows = torch.tensor([0, 7])
    mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)
    with pytest.raises(RuntimeError, match="cache row 7 of row 1 is outside the cache's 2 rows"):
        fused(tokens, positions, mask, ours)


def test_one_kernel_per_layer_only_where_it_computes_the_same_layer(linear_backend):
    """Biased projections (Qwen2's q/k/v), an active LoRA adapter, norms other than RMSNorm: op by op; plain
    layers on either linear backend: one kernel."""
    from functools import partial

    from peft import LoraConfig, get_peft_model

    from incentive.engines.decode_step import _FusedLayer
    from incentive.models import load_model

    load = partial(load_model, "tiny-random", onednn=linear_backend == "onednn")
    model = load()
    layer = model.model.layers[0]
    assert _FusedLayer.for_layer(layer) is not None
    attention = layer.self_attn
    attention.q_proj.bias = torch.nn.Parameter(torch.zeros(attention.q_proj.out_features))
    assert _FusedLayer.for_layer(layer) is None
    other = load().model.layers[0]
    other.post_attention_layernorm = torch.nn.LayerNorm(other.post_attention_layernorm.weight.shape)
    assert _FusedLayer.for_layer(other) is None
    policy = get_peft_model(load(), LoraConfig(r=2, target_modules=["v_proj"]))
    assert _FusedLayer.for_layer(policy.base_model.model.model.layers[0]) is None
    with policy.disable_adapter():
        assert _FusedLayer.for_layer(policy.base_model.model.model.layers[0]) is not None


@torch.no_grad()
def test_rows_of_one_prompt_read_one_copy_of_it(tiny_each_backend):
    """Rows sampled from one prompt read its keys and values from one row's copy (the first row of the prompt,
    even after it left the batch): logits equal reading each row's own copy bit for bit; garbage in the other
    copies changes nothing, garbage in the shared one changes the logits."""
    if build.kernel_ops() is None:
        pytest.skip(f"kernels unavailable: {build.unavailable_reason()}")
    model = tiny_each_backend[0]
    step = DecodeStep.for_model(model)
    contexts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    ids, mask, positions = left_padded(contexts)
    owner = torch.tensor([0, 0, 0, 1, 1, 1])

    def prefilled():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        return preallocate(out.cache, owner, 6)

    shared, own, spoiled = prefilled(), prefilled(), prefilled()
    assert shared.layers[0].prefix_rows.tolist() == [0, 0, 0, 3, 3, 3] and shared.layers[0].prefix_length == 9
    for layer in own.layers:
        layer.prefix_rows, layer.prefix_length = None, 0
    for layer in spoiled.layers:  # only rows 0 and 3 hold the copies that are read
        for buffer in (layer.key_buffer, layer.value_buffer):
            buffer[[1, 2, 4, 5], :, :9] = 1e3
    tokens, pos, m = torch.tensor([30, 31, 32, 33, 34, 35]), torch.tensor([5, 9])[owner], mask[owner]
    for keep in (None, torch.tensor([1, 2, 4, 5])):  # the rows holding the shared copies leave
        if keep is not None:
            for cache in (shared, own, spoiled):
                cache.batch_select_indices(keep)
            tokens, pos, m = tokens[keep], pos[keep], m[keep]
        for _ in range(2):
            m = torch.cat([m, m.new_ones(len(tokens), 1)], dim=1)
            got = step(tokens, pos, m, shared)
            assert torch.equal(got, step(tokens, pos, m, own))
            assert torch.equal(got, step(tokens, pos, m, spoiled))
            tokens, pos = got.argmax(-1), pos + 1
    for layer in spoiled.layers:
        layer.key_buffer[0, :, :9] = 1e3
    m = torch.cat([m, m.new_ones(len(tokens), 1)], dim=1)
    assert not torch.equal(step(tokens, pos, m, shared), step(tokens, pos, m, spoiled))
    spoiled.layers[0].prefix_rows = torch.tensor([0, 0, 0, 3, 3, 9])
    with pytest.raises(RuntimeError, match="prefix row 9 of cache row 5 is outside the cache's 6 rows"):
        step(tokens, pos, torch.cat([m, m.new_ones(len(tokens), 1)], dim=1), spoiled)


def test_prefix_sharing_is_set_per_prompt_and_dropped_when_the_buffers_are_compacted(tiny):
    model = tiny[0]
    ids, mask, positions = left_padded([[5, 6, 7], [8, 9]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = preallocate(out.cache, torch.tensor([1, 0, 1]), 2)
    layer = cache.layers[0]
    assert layer.prefix_rows.tolist() == [0, 1, 0] and layer.prefix_length == 3
    layer.batch_select_indices(torch.tensor([1, 2]))
    layer._compact()  # the op-by-op path: each row reads its own copy, whose source row may be gone
    assert layer.prefix_rows is None and layer.prefix_length == 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    assert preallocate(out.cache, torch.tensor([0, 1]), 2).layers[0].prefix_rows is None  # nothing shared
