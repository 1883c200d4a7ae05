"""bf16 sampling: the copy holds the policy's weights (LoRA merged), is reloaded only after an update, samples as
a bf16 model would, and the option is refused where it cannot pay."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError
from test_engines import prompts_for

from incentive.config import GenerationConfig
from incentive.engines import ENGINES, SamplingParams
from incentive.engines import low_precision as lp
from incentive.engines.cached import CachedEngine
from incentive.engines.low_precision import LowPrecisionCopy, has_bf16_units
from incentive.engines.merged import merged_lora
from incentive.models import load_model


def test_bf16_units_are_read_from_the_cpu_flags(tmp_path):
    with_amx = tmp_path / "amx"
    with_amx.write_text("vendor_id\t: GenuineIntel\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    without = tmp_path / "plain"
    without.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert has_bf16_units(with_amx)
    assert not has_bf16_units(without), "avx512_bf16 alone is not enough (~50x slower than fp32 measured)"
    assert not has_bf16_units(tmp_path / "missing")


def test_bf16_sampling_is_refused_without_amx_or_for_another_engine(monkeypatch):
    monkeypatch.setattr(lp, "has_bf16_units", lambda: False)
    with pytest.raises(ValidationError, match="amx_bf16"):
        GenerationConfig(sampling_dtype="bfloat16")
    monkeypatch.setattr(lp, "has_bf16_units", lambda: True)
    assert GenerationConfig(sampling_dtype="bfloat16").sampling_dtype == "bfloat16"
    with pytest.raises(ValidationError, match="cached engine"):
        GenerationConfig(engine="hf", sampling_dtype="bfloat16")


@torch.no_grad()
def test_copy_holds_the_policy_weights_and_reloads_only_when_stale(tiny):
    policy = tiny[0]
    copy = LowPrecisionCopy()
    model = copy.model_for(policy)
    assert model is not policy and next(model.parameters()).dtype == torch.bfloat16
    want = {n: t.to(torch.bfloat16) for n, t in policy.state_dict().items()}
    assert all(torch.equal(t, want[n]) for n, t in model.state_dict().items())

    weight = policy.model.layers[0].mlp.down_proj.weight
    original = weight.clone()
    try:
        weight.add_(1.0)
        stale_before = model.model.layers[0].mlp.down_proj.weight.clone()
        assert copy.model_for(policy) is model
        assert torch.equal(model.model.layers[0].mlp.down_proj.weight, stale_before), "not reloaded unasked"
        copy.mark_stale()
        assert torch.equal(copy.model_for(policy).model.layers[0].mlp.down_proj.weight, weight.bfloat16())
    finally:
        weight.copy_(original)


@torch.no_grad()
def test_copy_of_a_lora_policy_holds_the_merged_weights():
    torch.manual_seed(0)
    policy = get_peft_model(
        load_model("tiny-random"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    )
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.5)
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    merged = layer.get_base_layer().weight + layer.get_delta_weight("default")
    with merged_lora(policy):
        model = LowPrecisionCopy().model_for(policy)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, merged.bfloat16())


def test_engine_samples_from_the_bf16_copy_and_refreshes_after_an_update(tiny):
    """Greedy completions equal those of the bf16 model's own forward through the cached engine; after
    ``weights_changed`` the next rollout reloads the copy."""
    model, tokenizer = tiny
    examples, prompts = prompts_for(tokenizer, 2)
    greedy = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    engine = CachedEngine(model, tokenizer, sampling_dtype=torch.bfloat16)
    got = engine.generate(examples, prompts, [0, 1], greedy)
    reference = ENGINES.get("cached")(load_model("tiny-random").to(torch.bfloat16), tokenizer)
    want = reference.generate(examples, prompts, [0, 1], greedy)
    assert [c.completion_ids for c in got] == [c.completion_ids for c in want]
    assert engine.low_precision is not None and not engine.low_precision.stale
    engine.weights_changed()
    assert engine.low_precision.stale
    engine.generate(examples, prompts, [0, 1], greedy)
    assert not engine.low_precision.stale
