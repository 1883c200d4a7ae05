"""Whether a policy is LoRA, and what lies under its wrapper: the one place that asks, for every part that treats
a LoRA policy apart (checkpoints, the proxy, the KL reference, engines, the fused passes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a peft-wrapped policy (LoRA: ``model.lora``, or an adapter folder loaded for eval).
    Such a model exists only once peft is imported, so this never imports peft itself."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model(model: torch.nn.Module) -> Any:
    """The transformers model under a LoRA policy's wrapper (the model itself otherwise)."""
    return model.get_base_model() if is_lora(model) else model


def adapter_base(name: str | Path) -> str | None:
    """The base model of the LoRA adapter folder ``name`` (a LoRA run's checkpoint ``policy``; ``embedded`` where
    the adapter names none), None where ``name`` is no adapter folder."""
    config = Path(name) / "adapter_config.json"
    if not config.exists():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path") or "embedded"
