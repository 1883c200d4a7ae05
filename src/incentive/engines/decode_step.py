"""One decode step of a Llama-family model on a preallocated KV cache, without the model's ``forward``.

Through the Hugging Face forward each decode step also builds a causal mask from the 2-D attention mask,
routes keyword arguments through every layer and the attention interface, and updates the cache through its
generic API; without that, a rollout of the benchmark batch (16 rows, <= 64 steps) on the embedded model is
5-6 % faster (4.8-5.0 -> 4.5-4.7 s on a 2-core Xeon). This step calls the same modules (norms,
projections, MLP, rotary embedding and ``apply_rotary_pos_emb`` of the model's own module) in the same order,
and runs attention with ``scaled_dot_product_attention`` on the key/value heads as the Hugging Face SDPA path
does for one query token, so its logits are the model's own (tested bit-equal).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from incentive.engines.kv import PreallocatedLayer

_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
_ATTENTION_CLASSES = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})


class DecodeStep:
    """Logits of the next token for each row, given its last token, its position and its attention mask."""

    def __init__(self, model: PreTrainedModel) -> None:
        base = _base(model)
        self.body = base.model
        self.head = base.lm_head
        attention = self.body.layers[0].self_attn
        self.heads = base.config.num_attention_heads
        self.kv_heads = base.config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.rotary: Callable[..., Any] = sys.modules[type(attention).__module__].apply_rotary_pos_emb

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> DecodeStep | None:
        """The step where ``model`` is a plain Llama, Mistral or Qwen2 causal LM with full attention in every
        layer and SDPA attention; None otherwise (the caller then runs the model's forward)."""
        base = _base(model)
        config = getattr(base, "config", None)
        body = getattr(base, "model", None)
        if config is None or body is None or not isinstance(getattr(base, "lm_head", None), torch.nn.Module):
            return None
        layers = getattr(body, "layers", None)
        if not layers or config.model_type not in _MODEL_TYPES or config._attn_implementation != "sdpa":
            return None
        if config.model_type == "qwen2":
            windowed = bool(getattr(config, "use_sliding_window", False))
        else:
            windowed = getattr(config, "sliding_window", None) is not None
        kinds = getattr(config, "layer_types", None) or []
        if windowed or any(kind != "full_attention" for kind in kinds):
            return None
        if any(type(layer.self_attn).__name__ not in _ATTENTION_CLASSES for layer in layers):
            return None
        return cls(model)

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """[rows, vocab] logits after ``tokens`` ([rows]) at ``positions`` ([rows]); ``mask`` ([rows, cached
        positions + 1], 1 = attend) covers the cache and the new token, which is written into ``cache``."""
        rows = tokens.shape[0]
        hidden = self.body.embed_tokens(tokens[:, None])
        cos, sin = self.body.rotary_emb(hidden, positions[:, None])
        allowed = mask.bool()[:, None, None, :]
        for layer, kv in zip(self.body.layers, cache.layers, strict=True):
            if not isinstance(kv, PreallocatedLayer):
                raise TypeError("the decode step writes into a preallocated cache (engines.kv.preallocate)")
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attention.k_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attention.v_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.rotary(q, k, cos, sin)
            keys, values = kv.update(k, v)
            grouped = q.reshape(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(
                grouped, keys, values, attn_mask=allowed, scale=attention.scaling
            )
            out = out.reshape(rows, self.heads, 1, self.head_dim).transpose(1, 2).reshape(rows, 1, -1)
            hidden = hidden + attention.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.head(self.body.norm(hidden))[:, -1]


def _base(model: PreTrainedModel) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
