"""The soft prefix input adapter: where the prefix vectors land (mask, positions, labels), logprobs equal to a
hand-built forward, gradients into the projector, greedy decoding that sends the prefix once, and a model used
without a prefix that behaves exactly as before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from incentive.logprob_backends import Reference
from incentive.models.soft_prefix import (
    IGNORE,
    SoftPrefix,
    embed_with_prefix,
    greedy_generate,
    label_logprobs,
    masked_nll,
    prefixed_logits,
)


def toy_embedding() -> nn.Embedding:
    """Token i embeds as (i, 10 i, 100 i), so every column of a batch can be read off by eye."""
    table = nn.Embedding(10, 3)
    with torch.no_grad():
        table.weight.copy_(torch.arange(10.0)[:, None] * torch.tensor([1.0, 10.0, 100.0]))
    return table


PREFIX = torch.tensor([[[-1.0, -2.0, -3.0]], [[-4.0, -5.0, -6.0]]])
"""One prefix vector per row of a two-row batch."""


def test_prefix_goes_before_the_prompt_with_mask_positions_and_labels_right() -> None:
    batch = embed_with_prefix(
        toy_embedding(), [[1, 2, 3], [4, 5]], PREFIX, loss_masks=[[False, True, True], [False, True]]
    )
    assert batch.inputs_embeds.shape == (2, 4, 3)  # (B, L + 1, H)
    assert torch.equal(batch.inputs_embeds[0, 0], PREFIX[0, 0])
    assert torch.equal(batch.inputs_embeds[1, 1], PREFIX[1, 0])  # row 1 is left-padded by one column
    assert batch.inputs_embeds[0, 1:, 0].tolist() == [1.0, 2.0, 3.0]
    assert batch.inputs_embeds[1, 2:, 1].tolist() == [40.0, 50.0]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert batch.labels.tolist() == [[IGNORE, IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE, 5]]


def test_prefix_at_a_marked_position_and_several_vectors() -> None:
    prefix = torch.tensor([[[-1.0] * 3, [-2.0] * 3], [[-3.0] * 3, [-4.0] * 3]])
    batch = embed_with_prefix(toy_embedding(), [[1, 2, 3], [4, 5]], prefix, at=[1, 2])
    assert batch.inputs_embeds[0, :, 0].tolist() == [1.0, -1.0, -2.0, 2.0, 3.0]
    assert batch.inputs_embeds[1, :, 0].tolist() == [0.0, 4.0, 5.0, -3.0, -4.0]  # column 0 is padding
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="within its row"):
        embed_with_prefix(toy_embedding(), [[1, 2]], prefix[:1], at=[3])


def test_without_prefix_the_batch_is_the_plain_left_padded_one() -> None:
    batch = embed_with_prefix(toy_embedding(), [[1, 2, 3], [4]])
    assert batch.inputs_embeds.shape == (2, 3, 3)
    assert batch.inputs_embeds[1, :, 0].tolist() == [0.0, 0.0, 4.0]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


ROWS = [[5, 17, 300, 42, 8, 9], [77, 12, 6]]
MASKS = [[False, False, False, True, True, True], [False, True, True]]


def manual_logprobs(model, row, mask, prefix, at) -> torch.Tensor:
    """One row, unpadded, built by hand: tokens before ``at``, the prefix, the rest; the logprob of each labelled
    token from the logits one column before it."""
    embed = model.get_input_embeddings()
    ids = torch.tensor(row)
    inputs = torch.cat([embed(ids[:at]), prefix, embed(ids[at:])])[None]
    logp = torch.log_softmax(model(inputs_embeds=inputs).logits[0].float(), dim=-1)
    columns = [j + (prefix.shape[0] if j >= at else 0) for j in range(len(row))]
    return torch.stack([logp[columns[j] - 1, row[j]] for j in range(len(row)) if mask[j]])


@pytest.mark.parametrize("at", [None, [2, 1]])
def test_logprobs_with_a_prefix_equal_a_manual_forward(tiny, at) -> None:
    model, _ = tiny
    torch.manual_seed(0)
    prefix = torch.randn(2, 2, model.config.hidden_size)
    batch = embed_with_prefix(model.get_input_embeddings(), ROWS, prefix, at, MASKS)
    with torch.no_grad():
        got = label_logprobs(prefixed_logits(model, batch), batch.labels)
        for i, row in enumerate(ROWS):
            want = manual_logprobs(model, row, MASKS[i], prefix[i], at[i] if at else 0)
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_the_head_on_the_labelled_columns_only_gives_the_same_logprobs(tiny) -> None:
    model, _ = tiny
    batch = embed_with_prefix(model.get_input_embeddings(), ROWS, torch.ones(2, 1, 64), loss_masks=MASKS)
    assert batch.loss_columns() == 4  # labels in the last 3 columns, and the column before them
    with torch.no_grad():
        whole = label_logprobs(prefixed_logits(model, batch), batch.labels)
        kept = label_logprobs(prefixed_logits(model, batch, batch.loss_columns()), batch.labels)
    for a, b in zip(whole, kept, strict=True):
        torch.testing.assert_close(a, b)


def test_without_prefix_the_logprobs_are_the_reference_backends(tiny) -> None:
    model, _ = tiny
    contexts = [row[: mask.index(True)] for row, mask in zip(ROWS, MASKS, strict=True)]
    targets = [row[mask.index(True) :] for row, mask in zip(ROWS, MASKS, strict=True)]
    batch = embed_with_prefix(model.get_input_embeddings(), ROWS, loss_masks=MASKS)
    with torch.no_grad():
        got = label_logprobs(prefixed_logits(model, batch), batch.labels)
        want = Reference().logprobs(model, contexts, targets, [0, 1], 1.0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_projector_and_lora_leaves_the_base_frozen() -> None:
    from peft import LoraConfig, get_peft_model

    from incentive.models import load_model

    policy = get_peft_model(load_model("tiny-random"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    hidden = policy.config.hidden_size
    torch.manual_seed(0)
    projector = SoftPrefix(6, hidden, tokens=1)
    trainable = [p for p in policy.parameters() if p.requires_grad] + list(projector.parameters())
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    before = projector.proj.weight.detach().clone()
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    prefix = projector(torch.randn(2, 6))
    batch = embed_with_prefix(policy.get_input_embeddings(), ROWS, prefix, loss_masks=MASKS)
    total, count = masked_nll(prefixed_logits(policy, batch), batch.labels)
    (total / count).backward()
    assert count == 5
    assert projector.proj.weight.grad is not None and projector.proj.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(projector.proj.weight, before)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if not p.requires_grad)


def test_zero_features_change_the_logits(tiny) -> None:
    model, _ = tiny
    torch.manual_seed(1)
    projector = SoftPrefix(6, model.config.hidden_size)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        real = prefixed_logits(model, embed_with_prefix(embed, ROWS, projector(torch.randn(2, 6))))
        zero = prefixed_logits(model, embed_with_prefix(embed, ROWS, projector(torch.zeros(2, 6))))
    assert not torch.allclose(real[:, -1], zero[:, -1])


class CountingInputs:
    """A forward pre-hook that counts the model calls given ``inputs_embeds`` and those given ``input_ids``."""

    def __init__(self) -> None:
        self.embeds = 0
        self.ids = 0

    def __call__(self, module, args, kwargs) -> None:
        if kwargs.get("inputs_embeds") is not None:
            self.embeds += 1
        if kwargs.get("input_ids") is not None:
            self.ids += 1


def test_greedy_generation_sends_the_prefix_once_then_decodes_from_the_cache(tiny) -> None:
    model, _ = tiny
    torch.manual_seed(2)
    prefix = torch.randn(2, 1, model.config.hidden_size)
    batch = embed_with_prefix(model.get_input_embeddings(), ROWS, prefix)
    counter = CountingInputs()
    handle = model.register_forward_pre_hook(counter, with_kwargs=True)
    try:
        tokens = greedy_generate(model, batch, max_new_tokens=4, stop_ids=[-1])
    finally:
        handle.remove()
    assert (counter.embeds, counter.ids) == (1, 3)
    with torch.no_grad():
        first = model(inputs_embeds=torch.cat([batch.inputs_embeds[0, :1], batch.inputs_embeds[0, 1:]])[None])
    assert tokens[0][0] == int(first.logits[0, -1].argmax())
    assert [len(t) for t in tokens] == [4, 4]


def test_greedy_generation_without_prefix_matches_hf_generate(tiny) -> None:
    model, tokenizer = tiny
    batch = embed_with_prefix(model.get_input_embeddings(), ROWS, pad_id=tokenizer.pad_token_id)
    ours = greedy_generate(model, batch, max_new_tokens=5, stop_ids=[-1])
    ids = torch.full((2, 6), tokenizer.pad_token_id)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, row in enumerate(ROWS):
        ids[i, 6 - len(row) :] = torch.tensor(row)
        mask[i, 6 - len(row) :] = 1
    theirs = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert ours == theirs[:, 6:].tolist()


def test_a_model_used_without_an_adapter_is_untouched(tiny) -> None:
    model, _ = tiny
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        modules = len(list(model.modules()))
        SoftPrefix(4, model.config.hidden_size)(torch.ones(1, 4))
        prefixed_logits(model, embed_with_prefix(model.get_input_embeddings(), ROWS, torch.ones(2, 1, 64)))
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert len(list(model.modules())) == modules
