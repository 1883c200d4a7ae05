"""The trainable policy: a full model or a LoRA-wrapped one, its KL reference, and weight restore."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from incentive.config import ConfigError, ModelConfig
from incentive.models import load_model
from incentive.models.lora import adapter_base, is_lora
from incentive.models.lora_linear import fuse_lora
from incentive.models.packed_body import recompute_layers


def build_policy(cfg: ModelConfig) -> PreTrainedModel:
    """Load the model; wrap it with LoRA adapters when ``cfg.lora`` is set."""
    model = load_model(cfg.name, onednn=True if cfg.update_products == "bfloat16" else cfg.onednn)
    model.config.use_cache = True
    if cfg.activation_checkpointing:
        try:
            recompute_layers(model)
        except ValueError as exc:
            raise ConfigError(f"model.activation_checkpointing: {exc}") from None
    if cfg.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    policy = get_peft_model(model, lora)
    fuse_lora(policy)
    return policy


def trainable_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def load_policy_weights(model: PreTrainedModel, folder: Path) -> None:
    """Restore weights written by ``save_pretrained`` (full model or adapter) into a built policy."""
    if is_lora(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {folder} does not match the model: missing {missing}, extra {unexpected}"
        )
    if tied:
        model.tie_weights()


def load_model_for_eval(name: str) -> PreTrainedModel:
    """A model to evaluate: a name/path, or a checkpoint's ``policy`` folder (full model or LoRA adapter;
    checkpoints carry their tokenizer, so ``load_tokenizer(name)`` works for them too)."""
    base = adapter_base(name)
    if base is None:
        return load_model(name).eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base), name).eval()
