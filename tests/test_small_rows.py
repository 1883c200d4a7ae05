"""The small-row decode kernel: F.linear's numbers to fp32 rounding, deterministic, and a clean fallback."""

import logging

import pytest
import torch
from torch.nn import functional as F

from incentive.kernels import small_rows

needs_kernel = pytest.mark.skipif(
    small_rows.unavailable_reason() is not None,
    reason=f"kernel unavailable: {small_rows.unavailable_reason()}",
)


@needs_kernel
def test_hand_computed_product():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]])
    weight = torch.tensor([[1.0, 0.0, 1.0], [0.5, 0.5, 0.5], [2.0, 0.0, 0.0]])
    got = small_rows.small_rows_op()(x, [weight])
    assert torch.equal(got, torch.tensor([[4.0, 3.0, 2.0], [2.0, 0.5, 0.0]]))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 16, 32])
@pytest.mark.parametrize(("out", "inner"), [(33, 70), (3, 5), (64, 576), (8, 1536)])
def test_matches_a_float64_product(rows, out, inner):
    """Tiles of 6 rows and their remainders, groups of 4 weight rows and the last partial group, K with and
    without a tail shorter than 16 lanes."""
    generator = torch.Generator().manual_seed(rows * 1000 + out)
    x = torch.randn(rows, inner, generator=generator)
    weight = torch.randn(out, inner, generator=generator)
    exact = x.double() @ weight.double().t()
    got = small_rows.small_rows_op()(x, [weight])
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
        one = small_rows.small_rows_op()(x, [weight])
        torch.set_num_threads(2)
        two = small_rows.small_rows_op()(x, [weight])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(two, small_rows.small_rows_op()(x, [weight]))


@needs_kernel
def test_rejects_what_it_does_not_compute():
    op = small_rows.small_rows_op()
    with pytest.raises(RuntimeError, match="2-D float32 CPU tensor"):
        op(torch.ones(2, 3, dtype=torch.float64), [torch.ones(4, 3)])
    with pytest.raises(RuntimeError, match="float32 CPU weights only"):
        op(torch.ones(2, 3), [torch.ones(4, 3, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weights \[N, K\]"):
        op(torch.ones(2, 3), [torch.ones(4, 3), torch.ones(4, 5)])
    with pytest.raises(RuntimeError, match="no weights"):
        op(torch.ones(2, 3), [])
    assert op(torch.ones(0, 3), [torch.ones(4, 3)]).shape == (0, 4)


def test_many_rows_and_other_dtypes_go_to_f_linear():
    """Bit-equal to F.linear where the kernel does not run: above MAX_ROWS rows, bf16, no rows."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 16, generator=generator)
    many = torch.randn(small_rows.MAX_ROWS + 1, 16, generator=generator)
    assert torch.equal(small_rows.linear(many, weight), F.linear(many, weight))
    low = many[:4].bfloat16()
    assert torch.equal(small_rows.linear(low, weight.bfloat16()), F.linear(low, weight.bfloat16()))
    assert small_rows.linear(many[:0], weight).shape == (0, 8)


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setenv("INCENTIVE_KERNELS", "0")
    assert small_rows.unavailable_reason() == "INCENTIVE_KERNELS=0"
    monkeypatch.delenv("INCENTIVE_KERNELS")
    monkeypatch.setattr(small_rows.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "no AVX-512" in small_rows.unavailable_reason()
    monkeypatch.setattr(small_rows.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(small_rows.shutil, "which", lambda name: None)
    if small_rows.sys.platform.startswith("linux") and small_rows.platform.machine() == "x86_64":
        assert "no C++ compiler" in small_rows.unavailable_reason()


def test_a_failed_compile_falls_back_with_a_warning(monkeypatch, caplog):
    def broken():
        raise RuntimeError("Error building extension 'incentive_small_rows'\nc++: fatal error: killed")

    monkeypatch.setattr(small_rows, "unavailable_reason", lambda: None)
    monkeypatch.setattr(small_rows, "_build", broken)
    small_rows.small_rows_op.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=small_rows.__name__):
            assert small_rows.small_rows_op() is None
        assert "c++: fatal error: killed" in caplog.text and "small_rows.cpp" in caplog.text
        x, weights = torch.randn(2, 8), [torch.randn(3, 8), torch.randn(2, 8)]
        assert torch.equal(small_rows.linear(x, weights[0]), F.linear(x, weights[0]))
        want = torch.cat([F.linear(x, w) for w in weights], -1)
        assert torch.equal(small_rows.linear_cat(x, weights, [None, None]), want)
    finally:
        small_rows.small_rows_op.cache_clear()
