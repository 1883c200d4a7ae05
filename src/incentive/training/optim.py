"""AdamW and a warmup + constant/linear/cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from incentive.config import OptimConfig


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: OptimConfig, lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over each tensor): on CPU ~10x faster per step than the default
    multi-tensor path for the 135M-parameter embedded model (0.04 s vs 0.34-0.45 s)."""
    return torch.optim.AdamW(
        params, lr=lr or cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, kind = cfg.warmup_steps, cfg.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
