"""NOVER's proxy model: a lagging copy of the policy that scores reasoning perplexity (and may be the KL reference),
kept close by policy–proxy synchronization ``π_p ← α·π_p + (1 − α)·π_θ`` (spec §6).

The trainer calls :meth:`Proxy.view` as the scorer's "proxy" model and :meth:`Proxy.sync` on its own cadence
(``sync_every`` steps, deliberately not tied to checkpointing; spec pitfall 8).

- Full fine-tuning: the proxy is a deep copy of the policy; sync is an EMA of every parameter and floating buffer.
- LoRA (a peft ``PeftModel``): the base weights exist once. The proxy owns only its own LoRA factors per targeted
  linear layer and its own copies of the ``modules_to_save``. Its view disables the policy's adapter, adds the
  proxy's delta ``x·A_pᵀ·B_pᵀ·scaling`` through forward hooks on the LoRA layers (no dropout) and swaps the proxy's
  copies in for the saved modules, all undone on exit. Two ways to sync LoRA:

  * ``factors`` (the released code): EMA on A and on B separately. The product is then not the EMA of ΔW
    (spec pitfall 7).
  * ``exact`` (the paper's formula): the proxy's ΔW becomes exactly α·ΔW_p + (1 − α)·ΔW_θ. That sum is the product
    of concatenated factors B' = [√α·B_p, √(1−α)·B_θ], A' = [√α·A_p; √(1−α)·A_θ], re-compressed (QR of both
    factors, SVD of the small core, in float64) to its numerical rank: singular values below 1e-7 of the largest
    are dropped. The rank grows by at most the policy's r per sync and never beyond min(in, out); ``max_rank``
    caps it (then ΔW is the best rank-``max_rank`` approximation, no longer exact).

``frozen`` keeps the proxy at the policy as it was at construction forever (a snapshot, never the live policy;
spec pitfall 9).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Literal, cast

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper, TrainableTokensWrapper
from torch import nn
from transformers import PreTrainedModel

from incentive.models.lora import is_lora

ProxyMode = Literal["ema", "frozen"]
LoraSync = Literal["factors", "exact"]
RANK_RTOL = 1e-7


class Proxy(ABC):
    """The proxy model: a view to run it, a sync toward the policy, and its own state for checkpoints."""

    def __init__(self, mode: ProxyMode) -> None:
        if mode not in ("ema", "frozen"):
            raise ValueError(f"proxy mode must be 'ema' or 'frozen', got {mode!r}")
        self.mode = mode

    @abstractmethod
    def view(self) -> AbstractContextManager[PreTrainedModel]:
        """A model in eval mode whose forward is the proxy, for the duration of the with-block. For LoRA it is the
        policy's own (shared) model, so the policy must not be run inside the block."""

    def sync(self, alpha: float) -> None:
        """proxy ← α·proxy + (1 − α)·policy; a no-op for a frozen proxy."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"sync alpha must be in [0, 1], got {alpha}")
        if self.mode == "ema":
            with torch.no_grad():
                self._mix(alpha)

    @abstractmethod
    def _mix(self, alpha: float) -> None: ...

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The proxy's own tensors (for LoRA: not the shared base weights)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def make_proxy(
    policy: nn.Module,
    mode: ProxyMode = "ema",
    lora_sync: LoraSync = "exact",
    max_rank: int | None = None,
) -> Proxy:
    """A LoRA proxy sharing the base weights when the policy is a peft model, else a full copy."""
    if is_lora(policy):
        return LoraProxy(cast(PeftModel, policy), mode, lora_sync, max_rank)
    return CopyProxy(policy, mode)


class CopyProxy(Proxy):
    """Full fine-tuning: a frozen deep copy in eval mode, EMA'd toward the policy on sync."""

    def __init__(self, policy: nn.Module, mode: ProxyMode = "ema") -> None:
        super().__init__(mode)
        self.policy = policy
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        for param in self.model.parameters():
            param.grad = None

    @contextmanager
    def view(self) -> Iterator[PreTrainedModel]:
        yield cast(PreTrainedModel, self.model)

    def _mix(self, alpha: float) -> None:
        # named_parameters() lists a tied weight once, so it is mixed once
        theirs = dict(self.policy.named_parameters()) | dict(self.policy.named_buffers())
        mine = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        for name, tensor in mine.items():
            _ema_(tensor, theirs[name], alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


class LoraProxy(Proxy):
    """LoRA: the proxy is its own factors (A: r×in, B: out×r, scaled by the policy layer's ``scaling``) plus its
    own copies of the modules_to_save, applied on the policy's shared base weights inside :meth:`view`."""

    def __init__(
        self,
        policy: PeftModel,
        mode: ProxyMode = "ema",
        lora_sync: LoraSync = "exact",
        max_rank: int | None = None,
    ) -> None:
        super().__init__(mode)
        if lora_sync not in ("factors", "exact"):
            raise ValueError(f"lora_sync must be 'factors' or 'exact', got {lora_sync!r}")
        self.policy = policy
        self.lora_sync = lora_sync
        self.max_rank = max_rank
        self.adapter = _single_lora_adapter(policy)
        self.layers: dict[str, LoraLinear] = {}
        self.wrappers: dict[str, ModulesToSaveWrapper] = {}
        for name, module in policy.named_modules():
            if isinstance(module, TrainableTokensWrapper):
                raise NotImplementedError(
                    f"{name}: trainable_token_indices is not supported by the LoRA proxy"
                )
            if isinstance(module, ModulesToSaveWrapper) and self.adapter in module.modules_to_save:
                self.wrappers[name] = module
            elif isinstance(module, LoraLayer) and self.adapter in module.r:
                self.layers[name] = _check_lora_linear(name, module, self.adapter)
        self.A = {
            name: layer.lora_A[self.adapter].weight.detach().clone() for name, layer in self.layers.items()
        }
        self.B = {
            name: layer.lora_B[self.adapter].weight.detach().clone() for name, layer in self.layers.items()
        }
        # one deepcopy of all saved modules keeps weights they share (tied embeddings) shared in the proxy
        self.saved: dict[str, nn.Module] = copy.deepcopy(
            {name: wrapper.modules_to_save[self.adapter] for name, wrapper in self.wrappers.items()}
        )
        for module in self.saved.values():
            module.eval().requires_grad_(False)
        self._open = False

    @contextmanager
    def view(self) -> Iterator[PreTrainedModel]:
        if self._open:
            raise RuntimeError("the proxy view is already open")
        for name, layer in self.layers.items():
            if layer.merged:
                raise RuntimeError(
                    f"{name}: the policy's adapter is merged; unmerge it before using the proxy"
                )
        flags = [(param, param.requires_grad) for param in self.policy.parameters()]
        with ExitStack() as undo:
            undo.callback(_restore_requires_grad, flags)
            self._open = True
            undo.callback(setattr, self, "_open", False)
            undo.enter_context(self.policy.disable_adapter())
            for name, layer in self.layers.items():
                undo.callback(layer.register_forward_hook(self._add_delta(name)).remove)
            for name, wrapper in self.wrappers.items():
                undo.callback(setattr, wrapper, "original_module", wrapper.original_module)
                wrapper.original_module = self.saved[name]
            model = cast(PreTrainedModel, self.policy.get_base_model())
            undo.callback(model.train, model.training)
            model.eval()
            yield model

    def _add_delta(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            a, b = self.A[name], self.B[name]
            x = args[0].to(a.dtype)
            scaling = self.layers[name].scaling[self.adapter]
            return output + (nn.functional.linear(nn.functional.linear(x, a), b) * scaling).to(output.dtype)

        return hook

    def _mix(self, alpha: float) -> None:
        for name, layer in self.layers.items():
            a_theta = layer.lora_A[self.adapter].weight.detach()
            b_theta = layer.lora_B[self.adapter].weight.detach()
            if self.lora_sync == "factors":
                _ema_(self.A[name], a_theta, alpha)
                _ema_(self.B[name], b_theta, alpha)
            else:
                p, q = math.sqrt(alpha), math.sqrt(1.0 - alpha)
                b_cat = torch.cat([p * self.B[name].double(), q * b_theta.double()], dim=1)
                a_cat = torch.cat([p * self.A[name].double(), q * a_theta.double()], dim=0)
                b_new, a_new = compress(b_cat, a_cat, self.max_rank)
                self.B[name] = b_new.to(b_theta.dtype)
                self.A[name] = a_new.to(a_theta.dtype)
        mixed: set[int] = set()
        for name, wrapper in self.wrappers.items():
            theirs = dict(wrapper.modules_to_save[self.adapter].named_parameters(remove_duplicate=False))
            theirs |= dict(wrapper.modules_to_save[self.adapter].named_buffers(remove_duplicate=False))
            mine = dict(self.saved[name].named_parameters(remove_duplicate=False))
            mine |= dict(self.saved[name].named_buffers(remove_duplicate=False))
            for key, tensor in mine.items():
                if id(tensor) not in mixed:  # a weight shared between saved modules is mixed once
                    mixed.add(id(tensor))
                    _ema_(tensor, theirs[key], alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"lora_A.{name}": a for name, a in self.A.items()}
        state |= {f"lora_B.{name}": b for name, b in self.B.items()}
        for name, module in self.saved.items():
            state |= {f"saved.{name}.{key}": t for key, t in module.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise KeyError(
                f"proxy state mismatch: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        for name in self.layers:  # exact sync changes ranks, so the factors are replaced, not copied into
            self.A[name] = state[f"lora_A.{name}"].to(self.A[name]).clone()
            self.B[name] = state[f"lora_B.{name}"].to(self.B[name]).clone()
        for name, module in self.saved.items():
            prefix = f"saved.{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def compress(
    b: torch.Tensor, a: torch.Tensor, max_rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B: out×r, A: r×in) of the same product B·A with r = its numerical rank (≤ ``max_rank``):
    B = Q_B·R_B, Aᵀ = Q_A·R_A, R_B·R_Aᵀ = U·S·Vᵀ  ⇒  B·A = (Q_B·U·√S)·(√S·Vᵀ·Q_Aᵀ)."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    rank = int((s > s[0] * RANK_RTOL).sum()) if s.numel() and s[0] > 0 else 0
    if max_rank is not None:
        rank = min(rank, max_rank)
    root = s[:rank].sqrt()
    return q_b @ (u[:, :rank] * root), (root[:, None] * vh[:rank]) @ q_a.T


def _single_lora_adapter(policy: PeftModel) -> str:
    adapters = policy.active_adapters
    if len(adapters) != 1:
        raise NotImplementedError(f"the LoRA proxy needs exactly one active adapter, found {adapters}")
    config = policy.peft_config[adapters[0]]
    if config.peft_type.value != "LORA":
        raise NotImplementedError(f"the proxy supports LoRA adapters, not {config.peft_type.value}")
    if getattr(config, "bias", "none") != "none":
        raise NotImplementedError(
            "LoRA bias='all'/'lora_only' trains base biases, which the proxy cannot share"
        )
    return adapters[0]


def _check_lora_linear(name: str, layer: LoraLayer, adapter: str) -> LoraLinear:
    if not isinstance(layer, LoraLinear) or adapter not in layer.lora_A:
        raise NotImplementedError(
            f"{name}: the LoRA proxy supports LoRA on linear layers only, not {type(layer)}"
        )
    if adapter in layer.lora_variant or layer.lora_bias.get(adapter, False):
        raise NotImplementedError(
            f"{name}: LoRA variants (e.g. DoRA) and lora_bias are not supported by the proxy"
        )
    return layer


def _ema_(mine: torch.Tensor, theirs: torch.Tensor, alpha: float) -> None:
    """mine ← α·mine + (1 − α)·theirs in place; non-floating tensors are copied."""
    if mine.is_floating_point():
        mine.mul_(alpha).add_(theirs.to(mine.dtype), alpha=1.0 - alpha)
    else:
        mine.copy_(theirs)


def _restore_requires_grad(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for param, flag in flags:
        param.requires_grad_(flag)
