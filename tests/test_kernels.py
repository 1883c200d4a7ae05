"""The kernels: the numbers of F.linear, SDPA, SwiGLU, log-softmax, RMSNorm (to fp32 rounding) and rotary
embedding (exactly), hand-computed cases, determinism, and a clean fallback where they cannot be built."""

import logging
import math
import shutil

import pytest
import torch
from torch.nn import functional as F

from incentive.kernels import build, decode_attention, small_rows
from incentive.kernels.log_softmax import log_softmax_backward_, target_log_softmax
from incentive.kernels.rms_norm import rms_norm
from incentive.kernels.swiglu import swiglu

needs_kernel = pytest.mark.skipif(
    build.unavailable_reason() is not None, reason=f"kernels unavailable: {build.unavailable_reason()}"
)


def op(name):
    return getattr(build.kernel_ops(), name)


@needs_kernel
def test_hand_computed_product():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]])
    weight = torch.tensor([[1.0, 0.0, 1.0], [0.5, 0.5, 0.5], [2.0, 0.0, 0.0]])
    got = op("small_rows_linear")(x, [weight])
    assert torch.equal(got, torch.tensor([[4.0, 3.0, 2.0], [2.0, 0.5, 0.0]]))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 16, 32, 64, 101, 128])
@pytest.mark.parametrize(("out", "inner"), [(33, 70), (3, 5), (64, 576), (8, 1536)])
def test_matches_a_float64_product(rows, out, inner):
    """Tiles of 6 rows and their remainders, groups of 4 weight rows and the last partial group, K with and
    without a tail shorter than 16 lanes."""
    generator = torch.Generator().manual_seed(rows * 1000 + out)
    x = torch.randn(rows, inner, generator=generator)
    weight = torch.randn(out, inner, generator=generator)
    exact = x.double() @ weight.double().t()
    got = op("small_rows_linear")(x, [weight])
    assert got.shape == (rows, out) and got.dtype == torch.float32
    assert (got.double() - exact).abs().max() <= 1e-5 * inner**0.5 * (1 + exact.abs().max())


@needs_kernel
def test_linear_takes_bias_batches_and_views():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 40, generator=generator)[:, 1:]
    weight = torch.randn(24, 40, generator=generator)
    bias = torch.randn(24, generator=generator)
    torch.testing.assert_close(small_rows.linear(x, weight, bias), F.linear(x, weight, bias))
    torch.testing.assert_close(small_rows.linear(x, weight.t().contiguous().t()), F.linear(x, weight))


@needs_kernel
def test_several_weights_in_one_call_equal_their_own_products():
    """Parts of 9, 4 and 7 rows: groups of four rows never straddle two weights."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 48, generator=generator)
    weights = [torch.randn(rows, 48, generator=generator) for rows in (9, 4, 7)]
    biases = [torch.randn(9, generator=generator), None, torch.randn(7, generator=generator)]
    got = small_rows.linear_cat(x, weights, biases)
    assert got.shape == (5, 1, 20)
    for g, w, b in zip(got.split([9, 4, 7], -1), weights, biases, strict=True):
        assert torch.equal(g, small_rows.linear(x, w, b))
        torch.testing.assert_close(g, F.linear(x, w, b))


@needs_kernel
def test_deterministic_and_independent_of_the_thread_count():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 576, generator=generator)
    weight = torch.randn(1536, 576, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op("small_rows_linear")(x, [weight])
        torch.set_num_threads(2)
        two = op("small_rows_linear")(x, [weight])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(two, op("small_rows_linear")(x, [weight]))


@needs_kernel
def test_rejects_what_it_does_not_compute():
    linear = op("small_rows_linear")
    with pytest.raises(RuntimeError, match="2-D float32 CPU tensor"):
        linear(torch.ones(2, 3, dtype=torch.float64), [torch.ones(4, 3)])
    with pytest.raises(RuntimeError, match="float32 CPU weights only"):
        linear(torch.ones(2, 3), [torch.ones(4, 3, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weights \[N, K\]"):
        linear(torch.ones(2, 3), [torch.ones(4, 3), torch.ones(4, 5)])
    with pytest.raises(RuntimeError, match="no weights"):
        linear(torch.ones(2, 3), [])
    assert linear(torch.ones(0, 3), [torch.ones(4, 3)]).shape == (0, 4)


@pytest.mark.parametrize("onednn", [False, True])
def test_many_rows_and_other_dtypes_go_to_f_linear(monkeypatch, onednn):
    """Bit-equal to F.linear where the kernel does not run: above the row limit of this kind of machine (64 where
    MKL is the linear layers' BLAS, 128 where oneDNN is), bf16, no rows; the kernel up to the limit."""
    monkeypatch.setattr(small_rows, "onednn_preferred", lambda: onednn)
    assert small_rows.max_rows() == (small_rows.MAX_ROWS_ONEDNN if onednn else small_rows.MAX_ROWS_MKL)
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 16, generator=generator)
    at_limit = torch.randn(small_rows.max_rows(), 16, generator=generator)
    assert small_rows.applies(at_limit, [weight]) == (build.kernel_ops() is not None)
    many = torch.randn(small_rows.max_rows() + 1, 16, generator=generator)
    assert not small_rows.applies(many, [weight])
    assert torch.equal(small_rows.linear(many, weight), F.linear(many, weight))
    low = many[:4].bfloat16()
    assert torch.equal(small_rows.linear(low, weight.bfloat16()), F.linear(low, weight.bfloat16()))
    assert small_rows.linear(many[:0], weight).shape == (0, 8)


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setenv("INCENTIVE_KERNELS", "0")
    assert build.unavailable_reason() == "INCENTIVE_KERNELS=0"
    monkeypatch.delenv("INCENTIVE_KERNELS")
    monkeypatch.setattr(build.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "no AVX-512" in build.unavailable_reason()
    monkeypatch.setattr(build.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    if build.sys.platform.startswith("linux") and build.platform.machine() == "x86_64":
        assert "no C++ compiler" in build.unavailable_reason()
        monkeypatch.setattr(build.shutil, "which", lambda name: None if name == "ninja" else "/usr/bin/c++")
        assert "no ninja" in build.unavailable_reason()


def test_a_failed_compile_falls_back_with_a_warning(monkeypatch, caplog):
    def broken():
        raise RuntimeError("Error building extension 'incentive_small_rows'\nc++: fatal error: killed")

    monkeypatch.setattr(build, "unavailable_reason", lambda: None)
    monkeypatch.setattr(build, "_build", broken)
    build.kernel_ops.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=build.__name__):
            assert build.kernel_ops() is None
        assert "c++: fatal error: killed" in caplog.text and "incentive/kernels" in caplog.text
        x, weights = torch.randn(2, 8), [torch.randn(3, 8), torch.randn(2, 8)]
        assert torch.equal(small_rows.linear(x, weights[0]), F.linear(x, weights[0]))
        want = torch.cat([F.linear(x, w) for w in weights], -1)
        assert torch.equal(small_rows.linear_cat(x, weights, [None, None]), want)
        q, keys = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8)
        allowed = torch.ones(2, 5, dtype=torch.bool)
        want = sdpa(q, keys, keys, allowed, 0.5)
        torch.testing.assert_close(decode_attention.attend(q, keys, keys, allowed, 0.5), want)
    finally:
        build.kernel_ops.cache_clear()


def sdpa(q, keys, values, allowed, scale):
    """The reference: SDPA with the key/value heads repeated for their query heads, as [rows, 1, heads*dim]."""
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None, None, :], scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], 1, -1)


@needs_kernel
def test_attention_hand_computed():
    """One row, one head, keys [1, 0] and [0, 1] with values 10 and 20; the query [ln 3, 0] scores ln 3 and 0:
    weights 3/4 and 1/4, output 12.5. With the first key disallowed: 20."""
    q = torch.tensor([[[[math.log(3.0), 0.0]]]])
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    values = torch.tensor([[[[10.0, 0.0], [20.0, 1.0]]]])
    both = decode_attention.attend(q, keys, values, torch.tensor([[True, True]]), 1.0)
    torch.testing.assert_close(both, torch.tensor([[[12.5, 0.25]]]), rtol=1e-6, atol=1e-6)
    second = decode_attention.attend(q, keys, values, torch.tensor([[False, True]]), 1.0)
    assert torch.equal(second, torch.tensor([[[20.0, 1.0]]]))


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "length"), [(9, 3, 64, 150), (4, 2, 16, 7), (2, 2, 20, 33)]
)
def test_attention_matches_sdpa_on_cache_views(heads, kv_heads, dim, length):
    """Grouped heads, a head dim with a tail shorter than 16 lanes, keys and values as views of a larger
    preallocated cache, left padding (disallowed leading positions) of different lengths per row."""
    generator = torch.Generator().manual_seed(heads * 100 + length)
    rows = 5
    q = torch.randn(rows, heads, 1, dim, generator=generator)
    cache = torch.randn(2, rows, kv_heads, length + 9, dim, generator=generator)
    keys, values = cache[0, :, :, :length], cache[1, :, :, :length]
    allowed = torch.ones(rows, length, dtype=torch.bool)
    for row in range(rows):
        allowed[row, : min(row * 2, length - 1)] = False
    got = decode_attention.attend(q, keys, values, allowed, dim**-0.5)
    torch.testing.assert_close(got, sdpa(q, keys, values, allowed, dim**-0.5), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_attention_is_deterministic_across_thread_counts():
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(16, 9, 1, 64, generator=generator)
    keys, values = torch.randn(2, 16, 3, 140, 64, generator=generator)
    allowed = torch.rand(16, 140, generator=generator) > 0.1
    allowed[:, -1] = True
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_attention.attend(q, keys, values, allowed, 0.125)
        torch.set_num_threads(2)
        two = decode_attention.attend(q, keys, values, allowed, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_attention_rejects_mismatched_shapes():
    attention = op("decode_attention")
    with pytest.raises(RuntimeError, match=r"\[rows, length\] bool"):
        attention(
            torch.ones(2, 4, 8), torch.ones(2, 2, 5, 8), torch.ones(2, 2, 5, 8), torch.ones(2, 4).bool(), 1.0
        )
    with pytest.raises(RuntimeError, match="do not match"):
        attention(
            torch.ones(2, 3, 8), torch.ones(2, 2, 5, 8), torch.ones(2, 2, 5, 8), torch.ones(2, 5).bool(), 1.0
        )


@needs_kernel
def test_swiglu_hand_computed():
    """silu(0) = 0, silu(ln 3) = ln 3 * 3/4; gradients at g = 0: d/dg = u/2, d/du = 0."""
    gate = torch.tensor([0.0, math.log(3.0)], requires_grad=True)
    up = torch.tensor([2.0, 4.0], requires_grad=True)
    out = swiglu(gate, up)
    torch.testing.assert_close(out, torch.tensor([0.0, 3.0 * math.log(3.0)]), rtol=1e-6, atol=1e-7)
    out.sum().backward()
    assert gate.grad[0] == pytest.approx(1.0, abs=1e-7) and up.grad[0] == 0.0
    assert up.grad[1] == pytest.approx(0.75 * math.log(3.0), rel=1e-6)


@needs_kernel
def test_swiglu_matches_pytorch_values_and_gradients():
    """Large positive and negative gates (exp must not overflow), a tail shorter than 16 lanes, several threads."""
    generator = torch.Generator().manual_seed(7)
    gate = (torch.randn(37, 101, generator=generator) * 8).requires_grad_()
    up = torch.randn(37, 101, generator=generator).requires_grad_()
    grad = torch.randn(37, 101, generator=generator)
    got = swiglu(gate, up)
    (got * grad).sum().backward()
    ours = gate.grad.clone(), up.grad.clone()
    gate.grad, up.grad = None, None
    want = F.silu(gate) * up
    (want * grad).sum().backward()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(ours[0], gate.grad, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], up.grad, rtol=2e-6, atol=1e-6)
    assert torch.isfinite(swiglu(torch.tensor([-200.0, 200.0]), torch.ones(2))).all()


def test_swiglu_falls_back_for_other_dtypes():
    gate, up = torch.randn(3, 5).bfloat16(), torch.randn(3, 5).bfloat16()
    assert torch.equal(swiglu(gate, up), F.silu(gate) * up)


def test_fused_mlp_switches_the_embedded_families_only(tiny):
    from incentive.models.fused_mlp import is_gated_silu_mlp

    mlp = tiny[0].model.layers[0].mlp
    assert type(mlp).__name__ == "FusedLlamaMLP" and is_gated_silu_mlp(mlp)
    x = torch.randn(2, 3, tiny[0].config.hidden_size)
    want = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-6)
    assert not is_gated_silu_mlp(torch.nn.Linear(2, 2))


@needs_kernel
def test_log_softmax_hand_computed():
    """Logits [0, ln 3]: log-sum-exp ln 4, logprobs ln 1/4 and ln 3/4. At scale 2 (temperature 1/2) the scaled
    logits are [0, ln 9]: ln 10. The gradient of g · logp[token 1] is g · s · ([0, 1] - softmax): s = 1,
    g = 2 gives [-1/2, 1/2]."""
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    logp, lse = target_log_softmax(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(lse, torch.full((2,), math.log(4.0)))
    torch.testing.assert_close(logp, torch.tensor([math.log(0.25), math.log(0.75)]))
    logp, lse = target_log_softmax(logits, torch.tensor([0, 1]), 2.0)
    torch.testing.assert_close(lse, torch.full((2,), math.log(10.0)))
    torch.testing.assert_close(logp, torch.tensor([math.log(0.1), math.log(0.9)]))
    logp, lse = target_log_softmax(logits, torch.tensor([1, 1]))
    d = log_softmax_backward_(logits.clone(), lse, torch.tensor([1, 1]), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(d, torch.tensor([[-0.5, 0.5], [0.0, 0.0]]))


@needs_kernel
@pytest.mark.parametrize("vocabulary", [1, 15, 16, 17, 64, 65, 300, 49152])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.7])
def test_log_softmax_matches_pytorch_values_and_gradients(vocabulary, scale):
    """Vector tails, the unrolled loop of 64 and its remainder, a full vocabulary; logits spread over ±60 so
    most exponentials underflow."""
    generator = torch.Generator().manual_seed(vocabulary)
    logits = torch.randn(7, vocabulary, generator=generator) * 20
    tokens = torch.randint(0, vocabulary, (7,), generator=generator)
    grad = torch.randn(7, generator=generator)
    leaf = logits.clone().requires_grad_()
    want = torch.log_softmax(leaf * scale, -1).gather(-1, tokens[:, None]).squeeze(-1)
    (want * grad).sum().backward()
    logp, lse = target_log_softmax(logits, tokens, scale)
    torch.testing.assert_close(logp, want.detach(), rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(lse, (logits * scale).logsumexp(-1), rtol=2e-6, atol=2e-5)
    d = logits.clone()
    assert log_softmax_backward_(d, lse, tokens, grad, scale) is d
    torch.testing.assert_close(d, leaf.grad, rtol=2e-5, atol=1e-5)


@needs_kernel
def test_log_softmax_paths_agree_and_are_deterministic(monkeypatch):
    """The PyTorch fallback gives the kernel's numbers to rounding; the kernel's are the same on 1 and 2 threads."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 1000, generator=generator) * 5
    tokens = torch.randint(0, 1000, (9,), generator=generator)
    grad = torch.randn(9, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = target_log_softmax(logits, tokens, 1.5)
        torch.set_num_threads(2)
        two = target_log_softmax(logits, tokens, 1.5)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    d_kernel = log_softmax_backward_(logits.clone(), two[1], tokens, grad, 1.5)
    monkeypatch.setattr(build, "ops_for", lambda *tensors: None)
    fallback = target_log_softmax(logits, tokens, 1.5)
    for a, b in zip(fallback, two, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(log_softmax_backward_(logits.clone(), two[1], tokens, grad, 1.5), d_kernel)


@needs_kernel
def test_log_softmax_rejects_what_it_does_not_compute():
    forward = op("target_log_softmax")
    with pytest.raises(RuntimeError, match="token 5 of row 1 is outside the vocabulary of 5"):
        forward(torch.zeros(2, 5), torch.tensor([0, 5]), 1.0)
    with pytest.raises(RuntimeError, match="one int64 token per row"):
        forward(torch.zeros(2, 5), torch.tensor([0]), 1.0)
    with pytest.raises(RuntimeError, match="must be positive"):
        forward(torch.zeros(2, 5), torch.tensor([0, 1]), 0.0)
    with pytest.raises(RuntimeError, match="float32 CPU logits only"):
        forward(torch.zeros(2, 5, dtype=torch.float64), torch.tensor([0, 1]), 1.0)


@needs_kernel
def test_rms_norm_backward_hand_computed():
    """x = [3, 4], w = [1, 2], eps = 0: r = 1/sqrt(12.5); with g = [1, 1], u = g·w = [1, 2] and sum(u·x) = 11,
    so dx = r·u − x·r³·11/2 = [−0.0905097, 0.0678822] and dw = g·x·r = [0.8485281, 1.1313708]."""
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    y = rms_norm(x, w, 0.0)
    r = 1 / math.sqrt(12.5)
    torch.testing.assert_close(y, torch.tensor([[3 * r, 8 * r]]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[-0.0905097, 0.0678822]]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, torch.tensor([0.8485281, 1.1313708]), rtol=1e-6, atol=1e-7)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 33), (70, 576), (2, 65, 16)])
def test_rms_norm_matches_float64_like_pytorch(shape):
    """Values bit-equal to F.rms_norm; gradients as close to a float64 reference as PyTorch's own (several
    blocks of rows, widths that are not a multiple of 16, leading dimensions)."""
    generator = torch.Generator().manual_seed(3)
    d = shape[-1]
    x = (torch.randn(*shape, generator=generator) * 3).requires_grad_()
    w = torch.randn(d, generator=generator).requires_grad_()
    grad = torch.randn(*shape, generator=generator)
    y = rms_norm(x, w, 1e-5)
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__
    y.backward(grad)
    ours = x.grad.clone(), w.grad.clone()
    x.grad, w.grad = None, None
    want = F.rms_norm(x, (d,), w, 1e-5)
    assert torch.equal(y, want)
    want.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.rms_norm(x64, (d,), w64, 1e-5).backward(grad.double())
    for got, pytorch, exact in ((ours[0], x.grad, x64.grad), (ours[1], w.grad, w64.grad)):
        bound = max(2 * (pytorch.double() - exact).abs().max().item(), 1e-6 * exact.abs().max().item())
        assert (got.double() - exact).abs().max().item() <= bound


@needs_kernel
def test_rms_norm_backward_is_deterministic_across_thread_counts():
    generator = torch.Generator().manual_seed(5)
    x, grad = torch.randn(300, 96, generator=generator), torch.randn(300, 96, generator=generator)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    w = torch.randn(96, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op("rms_norm_backward")(grad, x, rstd, w)
        torch.set_num_threads(2)
        two = op("rms_norm_backward")(grad, x, rstd, w)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_rms_norm_falls_back_without_gradients_or_kernels(monkeypatch):
    x, w = torch.randn(4, 8), torch.randn(8)
    assert torch.equal(rms_norm(x, w, 1e-6), F.rms_norm(x, (8,), w, 1e-6))
    assert rms_norm(x, w, 1e-6).grad_fn is None
    monkeypatch.setattr(build, "ops_for", lambda *tensors: None)
    leaf = x.clone().requires_grad_()
    assert "RMSNorm" not in type(rms_norm(leaf, w, 1e-6).grad_fn).__name__


@needs_kernel
def test_rms_norm_backward_rejects_what_it_does_not_compute():
    backward = op("rms_norm_backward")
    with pytest.raises(RuntimeError, match=r"grad and x \[rows, d\] expected"):
        backward(torch.zeros(2, 4), torch.zeros(2, 5), torch.ones(2), torch.ones(5))
    with pytest.raises(RuntimeError, match=r"rstd \[rows\] and weight \[d\] expected"):
        backward(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(3), torch.ones(4))
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        backward(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2), torch.ones(4, dtype=torch.float64))


@needs_kernel
def test_sampling_hand_computed():
    """Logits [0, ln 3]: probabilities 1/4 and 3/4, so a uniform of 0.2 draws token 0 and 0.3 token 1; at
    temperature 0.5 they are 1/10 and 9/10, so 0.2 draws token 1."""
    logits = torch.tensor([[0.0, math.log(3.0)]] * 3)
    uniforms = torch.tensor([0.2, 0.3, 0.0], dtype=torch.float64)
    tokens, logprobs = op("sample_tokens")(logits, 1.0, uniforms)
    assert tokens.tolist() == [0, 1, 0]
    torch.testing.assert_close(logprobs, torch.tensor([math.log(0.25), math.log(0.75), math.log(0.25)]))
    tokens, logprobs = op("sample_tokens")(logits[:1], 0.5, uniforms[:1])
    assert tokens.tolist() == [1] and logprobs.item() == pytest.approx(math.log(0.9), rel=1e-6)


@needs_kernel
@pytest.mark.parametrize("vocabulary", [1, 17, 49152])
def test_sampling_draws_what_the_pytorch_inverse_cdf_draws(vocabulary):
    """With the same uniforms, the PyTorch sampler's tokens; logprobs of log_softmax at the temperature;
    -inf logits never drawn; the same on 1 and 2 threads."""
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(64, vocabulary, generator=generator) * 4
    logits[:, ::3] = -float("inf") if vocabulary > 1 else 0.0
    uniforms = torch.rand(64, dtype=torch.float64, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op("sample_tokens")(logits, 0.7, uniforms)
        torch.set_num_threads(2)
        tokens, logprobs = op("sample_tokens")(logits, 0.7, uniforms)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], tokens) and torch.equal(one[1], logprobs)
    probs = torch.log_softmax(logits / 0.7, -1).exp()
    torch.manual_seed(0)
    expected_uniforms = torch.rand(64, 1, dtype=torch.float64)
    torch.manual_seed(0)
    # the engine draws its uniforms as inverse_cdf does: the same random stream either way
    assert torch.equal(expected_uniforms.squeeze(-1), torch.rand(64, dtype=torch.float64))
    cdf = probs.double().cumsum(-1)
    want = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True).squeeze(-1)
    assert torch.equal(tokens, want.clamp(max=vocabulary - 1))
    if vocabulary > 1:
        assert (tokens % 3 != 0).all()
    want_logprobs = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_sampling_rejects_what_it_does_not_compute():
    sample = op("sample_tokens")
    with pytest.raises(RuntimeError, match="one float64 uniform per row"):
        sample(torch.zeros(2, 5), 1.0, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="temperature must be positive"):
        sample(torch.zeros(2, 5), 0.0, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"float32 CPU logits \[rows, vocabulary\]"):
        sample(torch.zeros(2, 5, dtype=torch.float64), 1.0, torch.zeros(2, dtype=torch.float64))


@needs_kernel
def test_rotary_hand_computed():
    """head_dim 4: x = [x1, x2] with halves [1, 2] and [3, 4]; forward [x1 c1 - x2 s1, x2 c2 + x1 s2]."""
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    cos = torch.tensor([[0.5, 1.0, 0.5, 1.0]])
    sin = torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    assert op("rotary_forward")(x, cos, sin).tolist() == [[[0.5 - 6.0, 2.0, 1.5 + 2.0, 4.0]]]
    assert op("rotary_backward")(x, cos, sin).tolist() == [[[0.5 + 6.0, 2.0, 1.5 - 2.0, 4.0]]]


@needs_kernel
@pytest.mark.parametrize(("tokens", "dim"), [(37, 64), (5, 40), (3, 2), (70, 128)])
def test_rotary_equals_transformers_bit_for_bit(tokens, dim):
    """Values and gradients of q and k (9 and 3 heads) equal ``apply_rotary_pos_emb``'s exactly, with head
    dims whose halves fill 16 lanes, leave a tail, or are a single lane."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from incentive.kernels.rotary import rotary

    gen = torch.Generator().manual_seed(tokens * dim)
    q = torch.randn(tokens, 9, dim, generator=gen, requires_grad=True)
    k = torch.randn(tokens, 3, dim, generator=gen, requires_grad=True)
    cos, sin = torch.randn(tokens, dim, generator=gen), torch.randn(tokens, dim, generator=gen)
    upstream = [torch.randn(tokens, 9, dim, generator=gen), torch.randn(tokens, 3, dim, generator=gen)]
    want = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    got = rotary(q, k, cos, sin, apply_rotary_pos_emb)
    for a, b in zip(
        [*want, *torch.autograd.grad(want, [q, k], upstream)],
        [*got, *torch.autograd.grad(got, [q, k], upstream)],
        strict=True,
    ):
        assert torch.equal(a, b)


def test_rotary_falls_back_to_the_models_function(monkeypatch):
    from incentive.kernels.rotary import rotary

    calls = []

    def fallback(q, k, cos, sin, unsqueeze_dim):
        calls.append(unsqueeze_dim)
        return q, k

    q, k, table = torch.ones(2, 3, 4), torch.ones(2, 1, 4), torch.ones(2, 4)
    rotary(q, k, table, table.clone().requires_grad_(True), fallback)  # a trained table: autograd's way
    rotary(q.double(), k.double(), table.double(), table.double(), fallback)
    monkeypatch.setattr(build, "ops_for", lambda *tensors: None)
    rotary(q, k, table, table, fallback)
    assert calls == [1, 1, 1]


@needs_kernel
def test_rotary_rejects_what_it_does_not_compute():
    x, table = torch.ones(2, 3, 4), torch.ones(2, 4)
    with pytest.raises(RuntimeError, match=r"\[tokens, heads, head_dim\]"):
        op("rotary_forward")(torch.ones(2, 4), table, table)
    with pytest.raises(RuntimeError, match="odd head_dim"):
        op("rotary_forward")(torch.ones(2, 3, 5), torch.ones(2, 5), torch.ones(2, 5))
    with pytest.raises(RuntimeError, match=r"cos and sin must be \[tokens, head_dim\]"):
        op("rotary_forward")(x, torch.ones(3, 4), torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="float32 CPU"):
        op("rotary_backward")(x.double(), table.double(), table.double())


def test_checkouts_of_the_same_sources_compile_the_same_files(tmp_path, monkeypatch):
    """Two checkouts of the same kernels (other paths, same bytes) stage them to the same files of the shared
    build folder, so their build files match and neither rebuilds the other's library; a source that changes is
    staged anew."""
    other = tmp_path / "other-checkout"
    other.mkdir()
    for source in build.SOURCES + build.HEADERS:
        shutil.copyfile(source, other / source.name)
    folder = tmp_path / "build"
    folder.mkdir()
    first = build.staged_sources(folder)
    monkeypatch.setattr(build, "SOURCES", tuple(other / s.name for s in build.SOURCES))
    monkeypatch.setattr(build, "HEADERS", tuple(other / h.name for h in build.HEADERS))
    assert build.staged_sources(folder) == first
    assert all(path.parent == folder / "src" for path in first)
    staged = sorted(path.name for path in (folder / "src").iterdir())
    assert staged == sorted(path.name for path in build.SOURCES + build.HEADERS)
    header = other / build.HEADERS[0].name
    header.write_text(header.read_text() + "\n// changed\n")
    build.staged_sources(folder)
    assert (folder / "src" / header.name).read_text().endswith("// changed\n")


def test_each_torch_installation_builds_in_its_own_folder(monkeypatch):
    """Two environments (another venv's torch, same version and sources) get their own build folders: the build
    file names each installation's headers, so a shared folder would be rebuilt by each in turn."""
    here = build.build_folder()
    assert build.build_folder() == here
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv/site-packages/torch/__init__.py")
    assert build.build_folder() != here and build.build_folder().parent == here.parent
