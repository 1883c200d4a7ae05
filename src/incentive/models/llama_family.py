"""Which models the hand-written passes (the decode step, the packed training body) can run: plain Llama,
Mistral and Qwen2 causal LMs with SDPA and full attention in every layer, whose modules they call in order."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from incentive.models.lora import base_model

_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
_ATTENTION_CLASSES = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})


def is_plain_llama_family(model: PreTrainedModel) -> bool:
    """True where ``model`` is a Llama, Mistral or Qwen2 causal LM with a head module, SDPA attention and full
    (not sliding-window) attention in every layer."""
    base = base_model(model)
    config = getattr(base, "config", None)
    body = getattr(base, "model", None)
    if config is None or body is None or not isinstance(getattr(base, "lm_head", None), torch.nn.Module):
        return False
    layers = getattr(body, "layers", None)
    if not layers or config.model_type not in _MODEL_TYPES or config._attn_implementation != "sdpa":
        return False
    if config.model_type == "qwen2":
        windowed = bool(getattr(config, "use_sliding_window", False))
    else:
        windowed = getattr(config, "sliding_window", None) is not None
    kinds = getattr(config, "layer_types", None) or []
    if windowed or any(kind != "full_attention" for kind in kinds):
        return False
    return all(type(layer.self_attn).__name__ in _ATTENTION_CLASSES for layer in layers)
