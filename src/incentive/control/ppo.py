"""Multi-critic PPO: GAE per reward component, the advantages mixed by each step's hinted weights, and the
clipped surrogate on the Beta policy with a value loss per critic."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from incentive.control.config import COMPONENTS, PPOConfig
from incentive.control.policy import ActorCritic, entropy, log_prob


def gae(
    rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, ends: np.ndarray, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column GAE over a flat run of steps [T, K]: from the last step back, δ_t = r_t + γ·V'_t − V_t and
    A_t = δ_t + γλ·A_{t+1}, where V'_t is the value after step t (0 when the episode terminated there, the
    final state's when it was cut short) and the recursion restarts where ``ends`` (episode over) is set.
    Returns (advantages, returns = A + V)."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    running = np.zeros(rewards.shape[1], dtype=np.float64)
    for t in reversed(range(rewards.shape[0])):
        if ends[t]:
            running = np.zeros_like(running)
        delta = rewards[t] + gamma * next_values[t] - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, adv + values


def mix(advantages: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A_t = Σ_k w_t,k · A_t^(k), each step's weights renormalised to the simplex first. [T, K], [T, K] → [T]."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    w = w / w.sum(axis=1, keepdims=True)
    return (advantages * w).sum(axis=1)


def standardise(x: np.ndarray, axis: int = 0) -> np.ndarray:
    return (x - x.mean(axis=axis)) / (x.std(axis=axis) + 1e-8)


def combined_advantage(advantages: np.ndarray, weights: np.ndarray, normalize: str) -> np.ndarray:
    """The actor's advantage: per_critic standardises each critic's column before mixing (the weights then set
    relative importance regardless of reward scale), mixed standardises the mix, none leaves both alone."""
    if normalize == "per_critic":
        return mix(standardise(advantages), weights)
    mixed = mix(advantages, weights)
    return standardise(mixed) if normalize == "mixed" else mixed


@dataclass
class Batch:
    """One rollout's tensors: states [T, S], actions [T, 2], old log-probs [T], advantages [T], returns [T, K]."""

    states: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def update(model: ActorCritic, optimizer: torch.optim.Optimizer, batch: Batch, config: PPOConfig) -> dict[str, float]:
    """``config.epochs`` passes of shuffled minibatches of the PPO-clip loss + value_coef·Σ_k ½(V^(k) − R^(k))²
    − entropy_coef·H; returns the means of the losses, entropy, approximate KL and clip fraction."""
    sums: dict[str, float] = {}
    count = 0
    size = batch.states.shape[0]
    for _ in range(config.epochs):
        order = torch.randperm(size)
        for start in range(0, size - config.minibatch + 1, config.minibatch):
            idx = order[start : start + config.minibatch]
            dist = model.distribution(batch.states[idx])
            new = log_prob(dist, batch.actions[idx])
            ratio = torch.exp(new - batch.log_probs[idx])
            adv = batch.advantages[idx]
            policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - config.clip, 1 + config.clip) * adv).mean()
            value_losses = 0.5 * ((model.values(batch.states[idx]) - batch.returns[idx]) ** 2).mean(0)
            ent = entropy(dist).mean()
            loss = policy_loss + config.value_coef * value_losses.sum() - config.entropy_coef * ent
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                stats = {
                    "policy_loss": policy_loss.item(),
                    "entropy": ent.item(),
                    "approx_kl": (batch.log_probs[idx] - new).mean().item(),
                    "clip_fraction": ((ratio - 1).abs() > config.clip).float().mean().item(),
                    **{f"value_loss_{n}": v.item() for n, v in zip(COMPONENTS, value_losses, strict=True)},
                }
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
    return {key: value / max(count, 1) for key, value in sums.items()}
