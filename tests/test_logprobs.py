import torch

from incentive.logprobs import plan_batches, target_logprobs


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


def test_plan_batches_respects_budget_and_covers_all():
    lengths = [10, 3, 7, 7, 1, 12]
    batches = plan_batches(lengths, max_tokens=14)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 14
