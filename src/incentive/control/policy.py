"""The actor (a Beta policy over actions in [−1, 1]²) and one critic per reward component, as small MLPs."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Beta

EPS = 1e-6
"""Beta samples are kept this far inside (0, 1), so log-probs stay finite."""

LOG2 = math.log(2.0)


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    layers = [nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(hidden, outputs))


def to_unit(action: torch.Tensor) -> torch.Tensor:
    """An action in [−1, 1] as the Beta variable u = (a + 1) / 2, kept inside (0, 1)."""
    return ((action + 1.0) / 2.0).clamp(EPS, 1.0 - EPS)


def log_prob(dist: Beta, action: torch.Tensor) -> torch.Tensor:
    """log density of an action in [−1, 1]^d, summed over its dimensions: log Beta(u) − d·log 2 (the change of
    variables a = 2u − 1); the same function serves the rollout and the update."""
    return (dist.log_prob(to_unit(action)) - LOG2).sum(-1)


def entropy(dist: Beta) -> torch.Tensor:
    """Differential entropy of the action, summed over dimensions: H(u) + d·log 2."""
    return (dist.entropy() + LOG2).sum(-1)


def mean_action(dist: Beta) -> torch.Tensor:
    """The policy's mean action 2·α/(α+β) − 1 (used in evaluation)."""
    return 2.0 * dist.mean - 1.0


class ActorCritic(nn.Module):
    """A Beta policy with α, β = 1 + softplus(·) (unimodal), and ``components`` critics V^(k)(s), all reading
    the same state."""

    def __init__(
        self, state_size: int, hidden: int, actions: int = 2, components: int = 3, init_concentration: float = 4.0
    ) -> None:
        super().__init__()
        self.actions = actions
        self.actor = mlp(state_size, hidden, 2 * actions)
        last = self.actor[-1]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():  # start near α = β = init_concentration: mean action 0, moderate spread
            last.weight.mul_(0.01)
            last.bias.fill_(math.log(math.expm1(init_concentration - 1.0)))
        self.critics = nn.ModuleList(mlp(state_size, hidden, 1) for _ in range(components))

    def distribution(self, state: torch.Tensor) -> Beta:
        params = 1.0 + nn.functional.softplus(self.actor(state))
        return Beta(params[..., : self.actions], params[..., self.actions :])

    def values(self, state: torch.Tensor) -> torch.Tensor:
        """[..., components]: each critic's value of the state."""
        return torch.cat([critic(state) for critic in self.critics], dim=-1)
