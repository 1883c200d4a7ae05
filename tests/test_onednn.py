"""oneDNN linear layers and the preallocated KV cache: same numbers as the default kernels, forward and backward."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from incentive.config import ModelConfig
from incentive.engines.kv import PreallocatedLayer
from incentive.models import load_model
from incentive.models.onednn import (
    OneDNNLinear,
    onednn_available,
    onednn_linear,
    onednn_preferred,
    use_onednn,
)
from incentive.training.policy import build_policy

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def _grads(fn, x, w, b):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    out = fn(x, w, b)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, w.grad, b.grad


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 5, 48), (200, 48), (1, 1, 48)])
def test_onednn_linear_matches_f_linear_forward_and_backward(shape):
    torch.manual_seed(0)
    x, w, b = torch.randn(*shape), torch.randn(96, 48), torch.randn(96)
    mine = _grads(onednn_linear, x, w, b)
    ref = _grads(torch.nn.functional.linear, x, w, b)
    for a, r in zip(mine, ref, strict=True):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_onednn_linear_is_deterministic_and_falls_back_outside_fp32_cpu():
    torch.manual_seed(1)
    x, w = torch.randn(70, 32), torch.randn(64, 32)
    assert torch.equal(onednn_linear(x, w), onednn_linear(x, w))
    x64, w64 = x.double(), w.double()
    assert torch.equal(onednn_linear(x64, w64), torch.nn.functional.linear(x64, w64))
    assert onednn_linear(torch.zeros(0, 32), w).shape == (0, 64)


@needs_onednn
def test_use_onednn_switches_linears_and_keeps_the_model_equal():
    plain = load_model("tiny-random", onednn=False)
    fast = load_model("tiny-random", onednn=True)
    assert not any(isinstance(m, OneDNNLinear) for m in plain.modules())
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert plain.state_dict().keys() == fast.state_dict().keys()
    assert use_onednn(fast) == 0  # already switched: nothing left to do

    ids = torch.randint(3, 1000, (2, 9))
    outs = []
    for model in (plain, fast):
        model.zero_grad()
        logits = model(input_ids=ids).logits
        logits.log_softmax(-1)[..., 7].sum().backward()
        outs.append((logits.detach(), model.lm_head.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)


def test_model_config_can_turn_onednn_off():
    policy = build_policy(ModelConfig(name="tiny-random", onednn=False))
    assert not any(isinstance(m, OneDNNLinear) for m in policy.modules())


@pytest.mark.parametrize(
    ("vendors", "expected"),
    [
        (["AuthenticAMD", "AuthenticAMD"], True),
        (["HygonGenuine"], True),
        (["GenuineIntel", "GenuineIntel"], False),  # MKL runs its own AVX-512 code there: faster than oneDNN
        (["AuthenticAMD", "GenuineIntel"], False),
        ([], False),  # no vendor line (ARM and others): the default BLAS
    ],
)
def test_onednn_is_preferred_by_cpu_vendor(tmp_path, monkeypatch, vendors, expected):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "".join(f"processor\t: {k}\nvendor_id\t: {v}\nflags\t: avx2\n\n" for k, v in enumerate(vendors))
    )
    assert onednn_preferred.__wrapped__(cpuinfo) is expected
    assert onednn_preferred.__wrapped__(tmp_path / "missing") is False


def test_default_model_config_follows_the_cpu_vendor(monkeypatch):
    for preferred in (True, False):
        monkeypatch.setattr(
            "incentive.models.loading.onednn_preferred", lambda preferred=preferred: preferred
        )
        policy = build_policy(ModelConfig(name="tiny-random"))
        switched = any(isinstance(m, OneDNNLinear) for m in policy.modules())
        assert switched is (preferred and onednn_available())


def test_preallocated_layer_returns_what_the_dynamic_layer_returns():
    torch.manual_seed(2)
    prefill = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    rows = torch.tensor([0, 0, 1])
    dynamic = DynamicLayer()
    dynamic.update(*prefill)
    dynamic.batch_select_indices(rows)
    mine = PreallocatedLayer(prefill[0][rows], prefill[1][rows], capacity=8)
    for step in range(3):
        new = torch.randn(len(rows), 3, 1, 4), torch.randn(len(rows), 3, 1, 4)
        assert all(torch.equal(a, b) for a, b in zip(dynamic.update(*new), mine.update(*new), strict=True))
        if step == 1:
            keep = torch.tensor([2, 0])
            dynamic.batch_select_indices(keep)
            mine.batch_select_indices(keep)
            rows = keep
    assert mine.get_seq_length() == dynamic.get_seq_length() == 8
    with pytest.raises(RuntimeError, match="KV cache full: 9 positions, capacity 8"):
        mine.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))


def test_fused_rms_norm_is_the_transformers_module_bit_equal_forward_close_backward():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from incentive.models.fused_norm import use_fused_rms_norm

    loaded = load_model("tiny-random", onednn=False)
    assert {type(m).__name__ for m in loaded.modules() if isinstance(m, LlamaRMSNorm)} == {
        "FusedLlamaRMSNorm"
    }

    torch.manual_seed(4)
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 48)
    results = []
    for fused in (False, True):
        if fused:
            assert use_fused_rms_norm(norm) == 1
        xi = x.clone().requires_grad_(True)
        norm.weight.grad = None
        out = norm(xi)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), xi.grad, norm.weight.grad.clone()))
    assert isinstance(norm, LlamaRMSNorm) and type(norm).__name__ == "FusedLlamaRMSNorm"
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1:], results[1][1:], strict=True):  # the backward kernel rounds differently
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
