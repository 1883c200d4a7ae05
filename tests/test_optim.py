"""The optimizer as runs build it: AdamW whose state exists before its first step."""

import pytest
import torch

from incentive.config import OptimConfig
from incentive.training.optim import allocate_adamw_state, build_optimizer, clipped_step


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in ((5, 3), (7,), (2, 2, 2))]


def _steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        clipped_step(optimizer, 1.0)


def test_state_made_before_the_first_step_gives_the_lazy_steps_bit_for_bit():
    config = OptimConfig(lr=1e-2, weight_decay=0.1)
    eager, lazy = _params(), _params()
    optimizer = build_optimizer(eager, config)
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in eager)
    assert all(float(optimizer.state[p]["step"]) == 0.0 for p in eager)
    plain = torch.optim.AdamW(lazy, lr=1e-2, betas=config.betas, weight_decay=0.1, fused=True)
    assert len(plain.state) == 0
    _steps(optimizer, eager)
    _steps(plain, lazy)
    for a, b in zip(eager, lazy, strict=True):
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[a][key], plain.state[b][key])
            assert optimizer.state[a][key].dtype == plain.state[b][key].dtype
    assert optimizer.state_dict()["state"].keys() == plain.state_dict()["state"].keys()


def test_only_fused_adamw_without_amsgrad_gets_its_state_made():
    with pytest.raises(ValueError, match="fused AdamW without amsgrad only"):
        allocate_adamw_state(torch.optim.AdamW(_params(), amsgrad=True, fused=True))
    with pytest.raises(ValueError, match="fused AdamW without amsgrad only"):
        allocate_adamw_state(torch.optim.AdamW(_params()))
