"""Vocabulary-sized weight gradients added straight into ``.grad``: the same numbers autograd gives, added to
what ``.grad`` already holds, and only inside ``gradients_in_place``."""

import pytest
import torch

from incentive import lm_head
from incentive.grad_in_place import embedding_in_place, gradients_in_place
from incentive.lm_head import target_logprobs_from_hidden
from incentive.models.onednn import onednn_available


def _embedding(padding_idx: int | None) -> torch.nn.Embedding:
    embedding = torch.nn.Embedding(20, 6, padding_idx=padding_idx)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(20, 6, generator=torch.Generator().manual_seed(1)))
    return embedding


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_rows_add_the_gradient_autograd_gives_to_what_grad_holds(padding_idx):
    ids = torch.tensor([[2, 5, 5, 7], [0, 2, 19, 5]])
    upstream = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(2))
    earlier = torch.randn(20, 6, generator=torch.Generator().manual_seed(3))

    reference = _embedding(padding_idx)
    (reference(ids) * upstream).sum().backward()

    embedding = _embedding(padding_idx)
    embedding.weight.grad = earlier.clone()
    through_autograd: list[torch.Tensor] = []
    embedding.weight.register_hook(lambda g: through_autograd.extend([g] if g is not None else []))
    with gradients_in_place():
        out = embedding_in_place(embedding, ids)
    assert out is not None
    torch.testing.assert_close(out, reference(ids))
    (out * upstream).sum().backward()
    assert through_autograd == []
    torch.testing.assert_close(embedding.weight.grad, earlier + reference.weight.grad)
    if padding_idx is not None:
        torch.testing.assert_close(embedding.weight.grad[padding_idx], earlier[padding_idx])


def test_embedding_rows_only_inside_the_context_and_for_plain_trainable_embeddings():
    ids = torch.tensor([1, 2, 3])
    embedding = _embedding(None)
    assert embedding_in_place(embedding, ids) is None
    with gradients_in_place():
        assert embedding_in_place(torch.nn.Embedding(20, 6, max_norm=1.0), ids) is None
        assert embedding_in_place(torch.nn.Embedding(20, 6, scale_grad_by_freq=True), ids) is None
        embedding.weight.requires_grad_(False)
        assert embedding_in_place(embedding, ids) is None
    assert embedding_in_place(_embedding(None), ids) is None, "the context is off again once left"


@pytest.mark.parametrize("onednn", [False, True])
def test_head_weight_gradient_goes_into_grad_inside_the_context(monkeypatch, onednn):
    """Chunked (3 positions) so the in-place path adds several products; ``.grad`` starts non-empty."""
    if onednn and not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(lm_head, "CHUNK_POSITIONS", 3)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=gen)
    weight = torch.randn(300, 16, generator=gen)
    tokens = torch.randint(0, 300, (10,), generator=gen)
    upstream = torch.randn(10, generator=gen)
    earlier = torch.randn(300, 16, generator=gen)

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    (target_logprobs_from_hidden(h, w, tokens, 0.7, onednn) * upstream).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    w2.grad = earlier.clone()
    through_autograd: list[torch.Tensor] = []
    w2.register_hook(lambda g: through_autograd.extend([g] if g is not None else []))
    with gradients_in_place():
        out = target_logprobs_from_hidden(h2, w2, tokens, 0.7, onednn)
    (out * upstream).sum().backward()
    assert through_autograd == [], "no [vocab, d] gradient went through autograd"
    torch.testing.assert_close(w2.grad, earlier + w.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h2.grad, h.grad)


def test_autograd_grad_outside_the_context_still_returns_the_head_gradient():
    """Only ``backward_target_logprobs`` turns the in-place path on; ``torch.autograd.grad`` elsewhere is
    untouched (the weight's gradient is returned, ``.grad`` stays empty)."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 8, generator=gen)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    out = target_logprobs_from_hidden(hidden, weight, torch.tensor([1, 2, 3, 4]))
    (grad,) = torch.autograd.grad(out.sum(), [weight])
    assert grad.abs().sum() > 0
    assert weight.grad is None
