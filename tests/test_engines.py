"""Engines: the cached decode loop matches HF generate on greedy decoding, token for token."""

import pytest
import torch

from incentive.config import TemplateConfig
from incentive.data import DataConfig, load_examples
from incentive.engines import ENGINES, SamplingParams
from incentive.engines.cached import sample
from incentive.run import build_template


def prompts_for(tokenizer, n=4):
    cfg = DataConfig(source="task:chain_sum", size=n, task_args={"min_terms": 2, "max_terms": 3})
    examples = load_examples(cfg).examples
    template = build_template(TemplateConfig())
    return examples, [template.render(e, tokenizer) for e in examples]


@pytest.mark.parametrize("n", [1, 3])
def test_cached_engine_greedy_equals_hf_generate(tiny_each_backend, kernels, n):
    model, tokenizer = tiny_each_backend
    examples, prompts = prompts_for(tokenizer)
    params = SamplingParams(n=n, max_new_tokens=12, temperature=0.0)
    single = SamplingParams(n=1, max_new_tokens=12, temperature=0.0)  # HF refuses greedy with n > 1
    a = ENGINES.get("hf")(model, tokenizer).generate(examples, prompts, [5, 6, 7, 8], single)
    a = [c for c in a for _ in range(n)]
    b = ENGINES.get("cached")(model, tokenizer).generate(examples, prompts, [5, 6, 7, 8], params)
    assert [c.completion_ids for c in a] == [c.completion_ids for c in b]
    assert [c.group_id for c in b] == [g for g in (5, 6, 7, 8) for _ in range(n)]
    assert all(
        torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)
        for x, y in zip(a, b, strict=True)
    )


def test_cached_engine_greedy_equals_hf_on_embedded_model():
    from incentive.models import load_model, load_tokenizer

    model, tokenizer = load_model("embedded"), load_tokenizer("embedded")
    examples, prompts = prompts_for(tokenizer, 3)
    params = SamplingParams(n=1, max_new_tokens=40, temperature=0.0)
    a = ENGINES.get("hf")(model, tokenizer).generate(examples, prompts, [0, 1, 2], params)
    b = ENGINES.get("cached")(model, tokenizer).generate(examples, prompts, [0, 1, 2], params)
    assert [c.completion_ids for c in a] == [c.completion_ids for c in b]
    assert [c.truncated for c in a] == [c.truncated for c in b]


def test_sampling_respects_top_p_and_reports_logprobs():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    torch.manual_seed(0)
    tokens, logprobs = sample(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert set(tokens.tolist()) == {0, 1}
    assert torch.allclose(logprobs, torch.log(torch.tensor([0.5, 0.3]))[tokens])
    share = (tokens == 0).float().mean().item()
    assert 0.55 < share < 0.70  # 0.5 / 0.8 renormalised


def test_inverse_cdf_draws_each_token_at_its_probability_and_never_a_zero():
    from incentive.engines.cached import inverse_cdf

    torch.manual_seed(0)
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0]]).repeat(40000, 1)
    tokens = inverse_cdf(weights)
    counts = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts[[1, 3, 4]], torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), atol=0.01)
    assert inverse_cdf(torch.tensor([[0.0, 0.0, 3.0]])).item() == 2


def test_lora_policy_samples_with_its_adapter_merged_and_keeps_its_weights():
    from peft import LoraConfig, get_peft_model

    from incentive.engines.merged import merged_lora
    from incentive.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny-random")
    policy = get_peft_model(
        load_model("tiny-random"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a trained adapter, not the zero init
    policy.eval()
    ids = torch.tensor([tokenizer("What is 2 + 3?").input_ids])
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    params_before = {n: id(p) for n, p in policy.named_parameters()}
    unmerged = policy(input_ids=ids).logits
    with policy.disable_adapter():
        base = policy(input_ids=ids).logits
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapter matters
    with merged_lora(policy):
        merged = policy(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert {n: id(p) for n, p in policy.named_parameters()} == params_before
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert torch.equal(policy(input_ids=ids).logits, unmerged)  # adapter layers switched back on

    seen = []
    body = policy.base_model.model.model  # the prefill runs the body, the decode steps their own layers
    original_forward = type(body).forward

    def spy(self, *args, **kwargs):
        seen.append(policy.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters)
        return original_forward(self, *args, **kwargs)

    examples, prompts = prompts_for(tokenizer, n=2)
    greedy = SamplingParams(n=1, max_new_tokens=4, temperature=0.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(body), "forward", spy)
        ENGINES.get("cached")(policy, tokenizer).generate(examples, prompts, [0, 1], greedy)
    assert seen and all(seen)  # sampled through the merged weights, adapter layers off
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_excluded_tokens_are_never_drawn_and_logprobs_stay_the_models():
    from incentive.engines.cached import _sample_without

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])).repeat(500, 1)
    torch.manual_seed(0)
    tokens, logprobs = _sample_without(torch.tensor([2]), logits, SamplingParams(temperature=1.0))
    assert 2 not in tokens.tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))
    greedy, lp = _sample_without(torch.tensor([2]), logits[:2], SamplingParams(temperature=0.0))
    assert greedy.tolist() == [0, 0] and lp[1].item() == pytest.approx(torch.tensor(0.1).log().item(), rel=1e-5)


@pytest.mark.parametrize("engine", ["hf", "cached"])
def test_no_end_token_before_min_new_tokens(tiny, engine):
    """A model that wants to stop at once (its end token's logit raised) writes exactly ``min_new_tokens``
    tokens and then stops; the cached engine's greedy tokens and logprobs equal HF generate's."""
    import copy

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    stops = ENGINES.get(engine)(model, tokenizer).stop_ids
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[stops[0]] = 50.0  # the first end token's logit dominates
    model.lm_head = head
    examples, prompts = prompts_for(tokenizer, 2)
    short = SamplingParams(n=1, max_new_tokens=12, temperature=0.0)
    assert all(
        c.length == 1 for c in ENGINES.get(engine)(model, tokenizer).generate(examples, prompts, [0, 1], short)
    )
    params = SamplingParams(n=1, max_new_tokens=12, temperature=0.0, min_new_tokens=5)
    got = ENGINES.get(engine)(model, tokenizer).generate(examples, prompts, [0, 1], params)
    assert [c.length for c in got] == [6, 6] and not any(c.truncated for c in got)
    assert all(not set(stops) & set(c.completion_ids[:5]) for c in got)
    want = ENGINES.get("hf")(model, tokenizer).generate(examples, prompts, [0, 1], params)
    assert [c.completion_ids for c in got] == [c.completion_ids for c in want]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)
