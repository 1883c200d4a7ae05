"""Supervised stage on prompt → target completion pairs (cold start for RL; several methods begin with one)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.logprobs import forward_target_logprobs, plan_batches
from incentive.training.sampler import EpochSampler


class SFTTrainer:
    """Token-mean negative log-likelihood of the target (EOS included), accumulated over micro-batches."""

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
    ) -> None:
        self.policy = policy
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.batch_size = batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.max_grad_norm = max_grad_norm
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        encoded = [
            (
                tokenizer(prompt, add_special_tokens=False).input_ids,
                tokenizer(target, add_special_tokens=False).input_ids + eos,
            )
            for prompt, target in pairs
        ]
        self.sampler = EpochSampler(encoded, seed)

    def step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = self.sampler.take(self.batch_size)
        contexts = [c for c, _ in batch]
        targets = [t for _, t in batch]
        n_tokens = sum(len(t) for t in targets)
        total = 0.0
        self.policy.train()
        for chunk in plan_batches(contexts, targets, self.micro_batch_tokens):
            logps = forward_target_logprobs(self.policy, contexts, targets, chunk)
            loss = -torch.cat(logps).sum() / n_tokens
            loss.backward()
            total += float(loss.detach())
        params = [q for g in self.optimizer.param_groups for q in g["params"] if q.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or math.inf)
        if torch.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        elapsed = time.perf_counter() - t0
        return {
            "stage": "sft",
            "step": step,
            "loss": total,
            "grad_norm": float(norm),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": n_tokens,
            "throughput/train_tokens_per_s": sum(len(c) + len(t) for c, t in batch) / elapsed,
            "time/step_s": elapsed,
        }
