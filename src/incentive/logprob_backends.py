"""Where training and scoring get their logprobs: a named backend, picked by the recipe's ``model.backend``.

``fused`` (default) is :mod:`incentive.logprobs`: shared contexts, packed passes, the engine's prefill, the fused
LM head and vocabulary-sized gradients written straight into ``.grad``. ``reference`` is the model's plain
forward over whole rows and ``loss.backward()``: short enough to check by eye, the yardstick the fused path is
tested against, and the path where every gradient reaches ``.grad`` through autograd's accumulation (which
gradient hooks, e.g. of distributed training, rely on).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from incentive.logprobs import backward_target_logprobs, left_padded, plan_batches, target_logprobs
from incentive.registry import Registry

if TYPE_CHECKING:
    from incentive.engines.prefilled import PrefilledPrompts

LossOf = Callable[[list[int], list[torch.Tensor]], torch.Tensor]
"""``loss_of(rows, logprobs)``: the loss of some rows, given their indices and per-token target logprobs."""


class LogprobBackend(ABC):
    """Teacher-forced logprobs of target tokens after their contexts: under a loss, forward and backward
    (:meth:`backward`), or without gradient (:meth:`score`)."""

    @abstractmethod
    def backward(
        self,
        model: PreTrainedModel,
        contexts: Sequence[Sequence[int]],
        targets: Sequence[Sequence[int]],
        indices: Sequence[int],
        loss_of: LossOf,
        temperature: float = 1.0,
        prefilled: PrefilledPrompts | None = None,
    ) -> float:
        """Forward and backward pass of ``loss_of`` on the logprobs of ``indices``' targets, gradients added to
        ``.grad``; returns the summed loss. ``prefilled`` may hold the engine's prefill of the contexts."""

    @abstractmethod
    def score(
        self,
        model: PreTrainedModel,
        contexts: Sequence[Sequence[int]],
        targets: Sequence[Sequence[int]],
        max_tokens: int = 4096,
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        """Per-token logprobs of every target after its context, in input order, without gradient; one forward
        pass computes about ``max_tokens`` padded tokens at most."""


LOGPROB_BACKENDS: Registry[type[LogprobBackend]] = Registry("logprob backend")


def logprob_backend(name: str) -> LogprobBackend:
    """The backend registered as ``name``."""
    return LOGPROB_BACKENDS.get(name)()


@LOGPROB_BACKENDS.register("fused")
class Fused(LogprobBackend):
    """:func:`incentive.logprobs.backward_target_logprobs` and :func:`incentive.logprobs.target_logprobs`."""

    def backward(
        self,
        model: PreTrainedModel,
        contexts: Sequence[Sequence[int]],
        targets: Sequence[Sequence[int]],
        indices: Sequence[int],
        loss_of: LossOf,
        temperature: float = 1.0,
        prefilled: PrefilledPrompts | None = None,
    ) -> float:
        return backward_target_logprobs(model, contexts, targets, indices, loss_of, temperature, prefilled)

    def score(
        self,
        model: PreTrainedModel,
        contexts: Sequence[Sequence[int]],
        targets: Sequence[Sequence[int]],
        max_tokens: int = 4096,
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        with torch.no_grad():
            return target_logprobs(model, contexts, targets, max_tokens, temperature)


@LOGPROB_BACKENDS.register("reference")
class Reference(LogprobBackend):
    """The model's own forward over whole rows (context + target, left-padded), ``log_softmax`` of the logits
    at the target positions and ``loss.backward()``: no shared contexts, no prefill, no fused head, and nothing
    reaches ``.grad`` but through autograd."""

    def backward(
        self,
        model: PreTrainedModel,
        contexts: Sequence[Sequence[int]],
        targets: Sequence[Sequence[int]],
        indices: Sequence[int],
        loss_of: LossOf,
        temperature: float = 1.0,
        prefilled: PrefilledPrompts | None = None,
    ) -> float:
        loss = loss_of(list(indices), self.logprobs(model, contexts, targets, indices, temperature))
        loss.backward()
        return float(loss.detach())

    @torch.no_grad()
    def score(
        self,
        model: PreTrainedModel,
        contexts: Sequence[Sequence[int]],
        targets: Sequence[Sequence[int]],
        max_tokens: int = 4096,
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        result = [torch.empty(0)] * len(contexts)
        for batch in plan_batches(contexts, targets, max_tokens):
            logps = self.logprobs(model, contexts, targets, batch, temperature)
            for i, logp in zip(batch, logps, strict=True):
                result[i] = logp
        return result

    def logprobs(
        self,
        model: PreTrainedModel,
        contexts: Sequence[Sequence[int]],
        targets: Sequence[Sequence[int]],
        indices: Sequence[int],
        temperature: float,
    ) -> list[torch.Tensor]:
        """Per-token logprobs of ``indices``' targets: rows are left-padded so that every target ends at the
        last position, and the model makes logits for the last (longest target + 1) positions only."""
        if any(targets[i] and not contexts[i] for i in indices):
            raise ValueError("a target needs at least one context token before it")
        ids, mask, positions = left_padded([[*contexts[i], *targets[i]] for i in indices])
        keep = max(len(targets[i]) for i in indices) + 1
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False
        )
        logp = torch.log_softmax(out.logits[:, :-1].float() / temperature, dim=-1)
        picked = logp.gather(-1, ids[:, ids.shape[1] - keep + 1 :, None]).squeeze(-1)
        return [picked[row, keep - 1 - len(targets[i]) :] for row, i in enumerate(indices)]
