"""One decode step of a Llama-family model on a preallocated KV cache, without the model's ``forward``.

Through the Hugging Face forward each decode step also builds a causal mask from the 2-D attention mask,
routes keyword arguments through every layer and the attention interface, and updates the cache through its
generic API; without that, a rollout of the benchmark batch (16 rows, <= 64 steps) on the embedded model is
5-6 % faster (4.8-5.0 -> 4.5-4.7 s on a 2-core Xeon). This step calls the same modules (norms, embedding,
rotary embedding, activation) in the same order and the same arithmetic as transformers' SDPA path for one
query token: with the kernels off its logits are the model's own, bit for bit (tested).

Where the kernels of :mod:`incentive.kernels` are built, a layer whose projections are plain bias-free
linear layers (``nn.Linear`` or its oneDNN form; LoRA layers count while their adapter is merged or switched off, as in sampling), whose norms are
RMSNorm and whose MLP is gated SiLU runs as one op (``kernels/decode_layer.cpp``): op by op, the ~15 small
ops between its products cost ~20 ms of a step (43-48 against 64-72 ms per step on the benchmark rollout). Other layers run op by op, their plain products through
:func:`incentive.kernels.small_rows.linear_cat` (each weight read once instead of MKL's pack-then-multiply) and
attention through :func:`incentive.kernels.decode_attention.attend`. Logits then agree with the model's forward
to fp32 rounding. Where the kernels are not built, the products run through the layers themselves (MKL or
oneDNN, whichever the model was loaded with), and any other module is called as it is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from incentive.engines.kv import PreallocatedLayer
from incentive.kernels import build, decode_attention, small_rows
from incentive.kernels.swiglu import swiglu
from incentive.models.fused_mlp import is_gated_silu_mlp
from incentive.models.fused_norm import NORM_CLASSES
from incentive.models.llama_family import is_plain_llama_family
from incentive.models.lora import base_model
from incentive.models.onednn import is_plain_linear

FUSED_MAX_ROWS = 128
"""Rows up to which a layer runs as one kernel call: on both CPU kinds measured (AMD EPYC, Intel Sapphire Rapids)
the one-kernel step is faster than the op-by-op one up to here, also where the op-by-op step's products are
faster through the BLAS than through the small-row kernel (see docs/performance.md)."""


class DecodeStep:
    """Logits of the next token for each row, given its last token, its position and its attention mask."""

    def __init__(self, model: PreTrainedModel) -> None:
        base = base_model(model)
        self.body = base.model
        attention = self.body.layers[0].self_attn
        self.heads = base.config.num_attention_heads
        self.kv_heads = base.config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.rotate_half: Callable[[torch.Tensor], torch.Tensor] = sys.modules[
            type(attention).__module__
        ].rotate_half
        self.layers = [_Layer(layer) for layer in self.body.layers]
        self.lm_head = base.lm_head
        self.project_head = Projections(base.lm_head)

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> DecodeStep | None:
        """The step where ``model`` is a plain Llama, Mistral or Qwen2 causal LM with full attention in every
        layer and SDPA attention (:func:`incentive.models.llama_family.is_plain_llama_family`); None otherwise
        (the caller then runs the model's forward)."""
        if not is_plain_llama_family(model):
            return None
        return cls(model)

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """The model's own forward over left-padded prompts, split where the last hidden state shows: the KV
        cache, the final hidden state of each row's last token [rows, 1, d] and its logits [rows, vocab]."""
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        last = out.last_hidden_state[:, -1:]
        return out.cache, last, self.lm_head(last)[:, -1]

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """[rows, vocab] logits after ``tokens`` ([rows]) at ``positions`` ([rows]); ``mask`` ([rows, cached
        positions + 1], 1 = attend) covers the cache and the new token, which is written into ``cache``."""
        rows = tokens.shape[0]
        hidden = self.body.embed_tokens(tokens[:, None])
        cos, sin = self.body.rotary_emb(hidden, positions[:, None])
        cos, sin = cos[:, None], sin[:, None]
        rotated = (self.heads + self.kv_heads) * self.head_dim
        allowed = mask.bool()
        ops = build.ops_for(hidden) if rows <= FUSED_MAX_ROWS else None
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            if not isinstance(kv, PreallocatedLayer):
                raise TypeError("the decode step writes into a preallocated cache (engines.kv.preallocate)")
            if ops is not None and layer.fused is not None:
                hidden = layer.fused(ops, hidden, cos, sin, kv, allowed, self.heads, self.kv_heads)
                continue
            x = layer.input_norm(hidden)
            qkv = layer.qkv(x)
            qk = qkv[..., :rotated].view(rows, 1, -1, self.head_dim).transpose(1, 2)
            qk = qk * cos + self.rotate_half(qk) * sin
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            v = qkv[..., rotated:].view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = kv.update(k, v)
            out = decode_attention.attend(q, keys, values, allowed, layer.scaling)
            hidden = hidden + layer.o(out)
            hidden = hidden + layer.mlp(layer.post_norm(hidden))
        return self.project_head(self.body.norm(hidden))[:, -1]


class Projections:
    """Linear layers applied to the same input, their outputs concatenated, as the decode step calls them: one
    call of the small-row kernel when each is a plain linear layer (or a LoRA layer whose adapter is merged or
    switched off) and the kernel applies to the input, else the layers themselves (so a oneDNN layer keeps
    oneDNN). Weights are read at each call: sampling from a LoRA policy swaps merged ones in."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        plain = [plain_linear(m) for m in modules]
        self.plain = plain if all(p is not None for p in plain) else None
        self.modules: tuple[torch.nn.Module, ...] = tuple(self.plain) if self.plain else modules

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain is not None:
            weights = [p.weight for p in self.plain]
            if small_rows.applies(x, weights):
                return small_rows.linear_cat(x, weights, [p.bias for p in self.plain])
        outs = [m(x) for m in self.modules]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


def plain_linear(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The linear layer that computes ``module``'s output on its own, if there is one: the module itself (an
    ``nn.Linear`` on either CPU backend, see :func:`incentive.models.onednn.is_plain_linear`), or the base layer
    of a peft LoRA layer whose adapter is merged or switched off."""
    if hasattr(module, "get_base_layer") and hasattr(module, "disable_adapters"):
        if not (module.disable_adapters or getattr(module, "merged", False)):
            return None
        module = module.get_base_layer()
    return module if is_plain_linear(module) else None


class _Layer:
    """One decoder layer's parts in the order the step calls them."""

    def __init__(self, layer: torch.nn.Module) -> None:
        attention = layer.self_attn
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.scaling = attention.scaling
        self.qkv = Projections(attention.q_proj, attention.k_proj, attention.v_proj)
        self.o = Projections(attention.o_proj)
        self.mlp = _GatedMLP.for_module(layer.mlp) or layer.mlp
        self.fused = _FusedLayer.for_layer(layer)


class _FusedLayer:
    """The whole layer as one kernel call (``kernels/decode_layer.cpp``), for a layer whose projections are plain
    linear layers without bias (LoRA counts while merged or off), whose norms are RMSNorm and whose MLP is gated
    SiLU. Called op by op, the ~15 small ops between the products cost ~60 us each inside the decode loop."""

    def __init__(self, layer: torch.nn.Module, linears: list[torch.nn.Linear]) -> None:
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.eps = float(layer.input_layernorm.variance_epsilon)
        self.scaling = float(layer.self_attn.scaling)
        self.linears = linears

    @classmethod
    def for_layer(cls, layer: torch.nn.Module) -> _FusedLayer | None:
        attention, mlp = layer.self_attn, layer.mlp
        if not is_gated_silu_mlp(mlp) or not all(
            _is_rms_norm(n) for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ):
            return None
        if layer.input_layernorm.variance_epsilon != layer.post_attention_layernorm.variance_epsilon:
            return None
        modules = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
        modules += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        linears = [plain_linear(m) for m in modules]
        if any(linear is None or linear.bias is not None for linear in linears):
            return None
        return cls(layer, [linear for linear in linears if linear is not None])

    def __call__(
        self,
        ops: Any,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: PreallocatedLayer,
        allowed: torch.Tensor,
        heads: int,
        kv_heads: int,
    ) -> torch.Tensor:
        """The layer's output for ``hidden`` [rows, 1, d]; the new key and value go into ``kv``."""
        rows, _, d = hidden.shape
        q, k, v, o, gate, up, down = (linear.weight for linear in self.linears)
        out = ops.decode_layer(
            hidden.reshape(rows, d),
            self.input_norm.weight,
            self.post_norm.weight,
            self.eps,
            [q, k, v],
            o,
            [gate, up],
            down,
            cos.reshape(rows, -1),
            sin.reshape(rows, -1),
            kv.key_buffer,
            kv.value_buffer,
            kv.rows,
            kv.prefix_rows,
            kv.prefix_length,
            kv.length,
            allowed,
            self.scaling,
            heads,
            kv_heads,
        )
        kv.written(1)
        return out.view(rows, 1, d)


def _is_rms_norm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        any(cls.__name__ in NORM_CLASSES for cls in type(module).__mro__)
        and isinstance(weight, torch.Tensor)
        and weight.dtype == torch.float32
        and hasattr(module, "variance_epsilon")
    )


class _GatedMLP:
    """``down(silu(gate(x)) * up(x))``, the MLP of Llama, Mistral and Qwen2, with its projections as
    :class:`Projections` and the activation through :func:`incentive.kernels.swiglu.swiglu`."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        self.gate_up = Projections(mlp.gate_proj, mlp.up_proj)
        self.down = Projections(mlp.down_proj)

    @classmethod
    def for_module(cls, mlp: torch.nn.Module) -> _GatedMLP | None:
        return cls(mlp) if is_gated_silu_mlp(mlp) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(swiglu(gate, up))
