"""The fused LoRA linear layer: peft's outputs and gradients, and peft's own path wherever it is not plain."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from incentive.config import LoraConfig as IncentiveLoraConfig
from incentive.config import ModelConfig
from incentive.models.lora_linear import FusedLoraLinear, fuse_lora
from incentive.models.onednn import onednn_available, use_onednn
from incentive.training.policy import build_policy


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(12, 20, bias=True)
        self.out = torch.nn.Linear(20, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(x)))


def _lora_net(dropout: float = 0.0, onednn: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    net = _Net()
    if onednn:
        use_onednn(net)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj", "out"])
    model = get_peft_model(net, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def _outputs_and_grads(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = [p.grad for name, p in sorted(model.named_parameters()) if p.requires_grad]
    return [out.detach(), x.grad, *grads]


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_matches_peft_in_outputs_and_gradients(onednn, dropout):
    """Dropout draws the same mask (same seed, one draw per layer as in peft)."""
    if onednn and not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(1))
    want = _outputs_and_grads(_lora_net(dropout, onednn), x)
    model = _lora_net(dropout, onednn)
    assert fuse_lora(model) == 2
    assert type(model(x).grad_fn).__name__ == "_LoraLinearFunctionBackward"
    got = _outputs_and_grads(model, x)
    assert len(got) == len(want) == 2 + 4, "x, output and the four adapter matrices"
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_lora_runs_the_fused_function_only_where_it_computes_what_peft_does():
    x = torch.randn(2, 12, requires_grad=True)
    model = _lora_net()
    fuse_lora(model)
    layer = model.base_model.model.proj
    assert isinstance(layer, FusedLoraLinear)
    assert type(layer(x).grad_fn).__name__ == "_LoraLinearFunctionBackward"
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x))
    layer.merge()
    assert layer.merged and type(layer(x).grad_fn).__name__ != "_LoraLinearFunctionBackward"
    layer.unmerge()
    model.add_adapter("second", LoraConfig(r=2, target_modules=["proj", "out"]))
    layer.set_adapter(["default", "second"])
    assert type(layer(x).grad_fn).__name__ != "_LoraLinearFunctionBackward", "two active adapters: peft's"


def test_lora_policies_are_built_with_fused_layers():
    policy = build_policy(
        ModelConfig(name="tiny-random", lora=IncentiveLoraConfig(r=4, alpha=8, dropout=0.0))
    )
    fused = [m for m in policy.modules() if isinstance(m, FusedLoraLinear)]
    assert fused and all(type(m) is FusedLoraLinear for m in fused)
