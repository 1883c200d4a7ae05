"""Fine-tuning the LM (LoRA or full) and the graph projector together on label + explanation targets, loss on the
assistant's tokens only; and greedy answers with the graph token, for the eval."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.geter.prompts import Encoded
from incentive.models.soft_prefix import (
    SoftPrefix,
    embed_with_prefix,
    greedy_generate,
    masked_nll,
    prefixed_logits,
)
from incentive.training.optim import clipped_step
from incentive.training.sampler import EpochSampler


class GeterSFT:
    """One optimizer step per call: a batch of queries, their graph features through the projector into one
    soft token each (none without a projector), token-mean NLL of the answers, clipping, AdamW, schedule."""

    def __init__(
        self,
        policy: PreTrainedModel,
        projector: SoftPrefix | None,
        items: Sequence[Encoded],
        features: torch.Tensor | None,
        batch_size: int,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        max_grad_norm: float | None,
        seed: int,
        pad_id: int,
    ) -> None:
        self.policy = policy
        self.projector = projector
        self.items = items
        self.features = features
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.pad_id = pad_id
        self.sampler = EpochSampler(list(range(len(items))), seed)

    def step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        chosen = self.sampler.take(self.batch_size)
        self.policy.train()
        prefix = None
        if self.projector is not None and self.features is not None:
            prefix = self.projector(self.features[chosen])
        items = [self.items[i] for i in chosen]
        batch = embed_with_prefix(
            self.policy.get_input_embeddings(),
            [it.row for it in items],
            prefix,
            [it.at for it in items],
            [it.loss_mask for it in items],
            self.pad_id,
        )
        total, count = masked_nll(prefixed_logits(self.policy, batch, batch.loss_columns()), batch.labels)
        loss = total / count
        loss.backward()
        norm = clipped_step(self.optimizer, self.max_grad_norm)
        self.scheduler.step()
        return {
            "stage": "sft",
            "step": step,
            "loss": float(loss.detach()),
            "grad_norm": float(norm),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": count,
            "time/step_s": time.perf_counter() - t0,
        }


@torch.no_grad()
def answer(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    projector: SoftPrefix | None,
    items: Sequence[Encoded],
    features: torch.Tensor | None,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to ``items``' prompts (one batch), the projector called once for the batch's prefix."""
    policy.eval()
    prefix = projector(features) if projector is not None and features is not None else None
    batch = embed_with_prefix(
        policy.get_input_embeddings(),
        [it.prompt for it in items],
        prefix,
        [it.at for it in items],
        pad_id=tokenizer.pad_token_id,
    )
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokens = greedy_generate(policy, batch, max_new_tokens, stops)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
