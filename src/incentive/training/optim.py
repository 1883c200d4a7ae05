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
    multi-tensor path for the 135M-parameter embedded model. Its state is made now
    (:func:`allocate_adamw_state`)."""
    optimizer = torch.optim.AdamW(
        params, lr=lr or cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True
    )
    allocate_adamw_state(optimizer)
    return optimizer


def allocate_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """The zero state AdamW makes at its first step, made before it: twice the trainable parameters' size,
    allocated while the heap is still empty instead of into the gaps that the first update's activations leave
    (a lower peak RSS, see docs/performance.md). The first step finds the state it would have made, so its
    result is the same bit for bit."""
    for group in optimizer.param_groups:
        if group["amsgrad"] or group["capturable"] or group["differentiable"] or not group["fused"]:
            raise ValueError("allocate_adamw_state makes the state of fused AdamW without amsgrad only")
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


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
