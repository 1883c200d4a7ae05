"""Log-softmax of scaled logits at one token per row, and its gradient written over the logits, through
``log_softmax.cpp`` where the kernels are built (:mod:`incentive.kernels.build`), else PyTorch ops that work in
place as far as they can.

The fused LM head (:mod:`incentive.lm_head`) makes logits 256 positions at a time: 50 MB per chunk for a 49k
vocabulary. PyTorch's ``logsumexp`` and the backward pass's subtraction, ``exp`` and product each sweep (and
some allocate) a tensor that size; the kernels read a chunk twice forward and rewrite it once backward.
Results agree with PyTorch's to fp32 rounding (the exp differs in the last bits).
"""

from __future__ import annotations

import torch

from incentive.kernels import build


def target_log_softmax(
    logits: torch.Tensor, tokens: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(scale · logits)`` at each row's token ([rows, vocabulary] logits, [rows] tokens), and
    each row's log-sum-exp of ``scale · logits`` (what :func:`log_softmax_backward_` needs)."""
    ops = build.ops_for(logits)
    if ops is not None and logits.dim() == 2 and logits.is_contiguous():
        return ops.target_log_softmax(logits, tokens, scale)
    scaled = logits * scale if scale != 1.0 else logits
    lse = scaled.logsumexp(-1)
    return scaled.gather(-1, tokens[:, None]).squeeze(-1) - lse, lse


def log_softmax_backward_(
    logits: torch.Tensor, lse: torch.Tensor, tokens: torch.Tensor, grad: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Overwrite ``logits`` with the gradient of ``sum(grad · target_log_softmax(logits, tokens, scale))``
    with respect to them: ``scale · grad · (onehot(token) − softmax(scale · logits))`` per row; returns them."""
    ops = build.ops_for(logits)
    if ops is not None and logits.dim() == 2 and logits.is_contiguous():
        ops.log_softmax_backward_(logits, lse, tokens, grad, scale)
        return logits
    if scale != 1.0:
        logits.mul_(scale)
    logits.sub_(lse[:, None]).exp_().mul_(-grad[:, None])
    logits[torch.arange(len(tokens), device=tokens.device), tokens] += grad
    if scale != 1.0:
        logits.mul_(scale)
    return logits
