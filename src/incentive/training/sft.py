"""Supervised stage on prompt → target completion pairs (cold start for RL; several methods begin with one)."""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.logprob_backends import Fused, LogprobBackend
from incentive.logprobs import plan_batches
from incentive.training.optim import clipped_step
from incentive.training.sampler import EpochSampler
from incentive.training.stage import Stage


class SplitsResponses(Protocol):
    """What cuts a target trace into (piece, is_observation) pieces: a tool call protocol or an environment."""

    def split_responses(self, text: str) -> list[tuple[str, bool]]: ...


class TargetEncoder:
    """A target completion → its token ids with EOS appended, and a loss mask (all ones)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def __call__(self, target: str) -> tuple[list[int], list[float]]:
        ids = self.tokenizer(target, add_special_tokens=False).input_ids + self.eos
        return ids, [1.0] * len(ids)


class ObservationMaskingEncoder(TargetEncoder):
    """Observations (tool or environment responses) in a target trace are tokenized on their own, as the
    environment engine places them, and left out of the loss (SFT on assistant turns only)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, protocol: SplitsResponses) -> None:
        super().__init__(tokenizer)
        self.protocol = protocol

    def __call__(self, target: str) -> tuple[list[int], list[float]]:
        ids: list[int] = []
        mask: list[float] = []
        for piece, is_observation in self.protocol.split_responses(target):
            piece_ids = self.tokenizer(piece, add_special_tokens=False).input_ids
            ids += piece_ids
            mask += [0.0 if is_observation else 1.0] * len(piece_ids)
        return ids + self.eos, mask + [1.0] * len(self.eos)


class SFTTrainer(Stage):
    """Token-mean negative log-likelihood of the target (EOS included), accumulated over micro-batches: each
    optimizer step takes ``grad_accum`` batches of ``batch_size``, run one after another (each cut further by
    token budget) and weighed by the tokens of all of them, so the step equals one batch ``grad_accum`` times as
    large."""

    name = "sft"
    label = "SFT"

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pairs: list[tuple[str, str]],
        batch_size: int,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        seed: int,
        micro_batch_tokens: int,
        max_grad_norm: float | None,
        encoder: TargetEncoder | None = None,
        grad_accum: int = 1,
        backend: LogprobBackend | None = None,
    ) -> None:
        self.model = policy
        self.backend = backend or Fused()
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.micro_batch_tokens = micro_batch_tokens
        self.max_grad_norm = max_grad_norm
        encode = encoder or TargetEncoder(tokenizer)
        encoded = [
            (tokenizer(prompt, add_special_tokens=False).input_ids, *encode(target))
            for prompt, target in pairs
        ]
        self.sampler = EpochSampler(encoded, seed)

    def step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = self.sampler.take(self.batch_size * self.grad_accum)
        contexts = [c for c, _, _ in batch]
        targets = [t for _, t, _ in batch]
        masks = [torch.tensor(m) for _, _, m in batch]
        n_tokens = int(sum(float(m.sum()) for m in masks))
        total = 0.0
        self.model.train()

        def loss_of(rows: list[int], logps: list[torch.Tensor]) -> torch.Tensor:
            weighted = torch.cat([lp * masks[i] for lp, i in zip(logps, rows, strict=True)])
            return -weighted.sum() / n_tokens

        for first in range(0, len(batch), self.batch_size):
            part = slice(first, first + self.batch_size)
            for chunk in plan_batches(contexts[part], targets[part], self.micro_batch_tokens):
                rows = [first + i for i in chunk]
                total += self.backend.backward(self.model, contexts, targets, rows, loss_of)
        norm = clipped_step(self.optimizer, self.max_grad_norm)
        self.scheduler.step()
        elapsed = time.perf_counter() - t0
        return {
            "stage": "sft",
            "step": step,
            "loss": total,
            "grad_norm": float(norm),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": n_tokens,
            "throughput/train_tokens_per_s": sum(len(c) + len(t) for c, t, _ in batch) / elapsed,
            "time/step_s": elapsed,
        }
