"""AdamW and a warmup + constant/linear/cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from incentive.config import OptimConfig


def clipped_step(optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
    """Clip the gradients of the optimizer's parameters to ``max_grad_norm`` (None or 0: no clipping), step only
    where their norm is finite (a batch with NaN or inf leaves the weights as they are), then clear them; returns
    the norm before clipping."""
    params = [q for group in optimizer.param_groups for q in group["params"] if q.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    if torch.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


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
