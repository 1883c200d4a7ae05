"""The RL stage's KL reference: the policy as RL first started (after any SFT), kept in the run folder so that a
resumed run anchors to the same model; under LoRA only a frozen copy of the adapter."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from incentive.config import ModelConfig
from incentive.models.lora import is_lora
from incentive.training.policy import build_policy, load_policy_weights

FOLDER = "rl-reference"


def initial_reference(policy: PreTrainedModel, model: ModelConfig, run_dir: Path) -> Any:
    """A view of the policy as it is now (the first time, written to ``run_dir/rl-reference``) or as it was when
    written (a resumed run)."""
    path = run_dir / FOLDER
    if is_lora(policy):
        return _lora_reference(policy, path, run_dir)
    if not path.exists():
        tmp = run_dir / f".{FOLDER}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp)
        tmp.replace(path)
    reference = build_policy(model.model_copy(update={"lora": None}))
    load_policy_weights(reference, path)
    reference.eval().requires_grad_(False)
    return model_view(reference)


def _lora_reference(policy: PreTrainedModel, path: Path, run_dir: Path) -> Any:
    """A frozen snapshot of the adapter (the proxy's machinery), applied on the shared base weights in its view:
    a few MB, where a full copy would double the model. An adapter still at its init (no SFT, B = 0) is the base
    model, run with the adapter off."""
    from incentive.proxy import LoraProxy

    snapshot = LoraProxy(policy, "frozen")
    file = path / "adapter_snapshot.safetensors"
    if file.exists():
        snapshot.load_state_dict(load_file(file))
    else:
        tmp = run_dir / f".{FOLDER}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in snapshot.state_dict().items()}, tmp / file.name)
        tmp.replace(path)
    if snapshot.saved or any(b.any() for b in snapshot.B.values()):
        return snapshot.view
    return adapter_off(policy)


def adapter_off(policy: PreTrainedModel) -> Any:
    """The LoRA policy with its adapter switched off: the base model, at no extra memory."""

    @contextmanager
    def view() -> Iterator[PreTrainedModel]:
        with policy.disable_adapter():
            yield policy

    return view


def model_view(model: PreTrainedModel) -> Any:
    """A model as the scorers take it: a context manager factory that yields it."""

    @contextmanager
    def view() -> Iterator[PreTrainedModel]:
        yield model

    return view
