"""Activation-subspace overlap: the hidden state of each prompt of two sets (at its last real token, or
averaged over its real tokens) at chosen layers, the principal directions of each set's states, and their MSO
against the random-subspace baseline."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from incentive.analysis.subspace_errors import SubspaceError
from incentive.analysis.subspace_linalg import energy_k, mso, mso_random, spectrum

ACTIVATION_ETAS = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
"""The default energy fractions of the activation overlaps."""
POOLS = ("last", "mean")


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """Prompts from a ``.jsonl`` file (each row's ``prompt`` string) or a text file (one per non-empty line).
    """
    file = Path(path)
    if not file.is_file():
        raise SubspaceError(f"--activations {path}: no such file")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SubspaceError(f"--activations {path}: row {number} is not JSON ({err.msg})") from err
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise SubspaceError(f"--activations {path}: row {number} has no 'prompt' string")
            prompts.append(prompt)
    else:
        prompts = lines
    if len(prompts) < 2:
        raise SubspaceError(f"--activations {path}: needs at least 2 prompts, found {len(prompts)}")
    return prompts[:limit] if limit else prompts


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per sequence from hidden states (batch × tokens × D) and the attention mask: the state at
    the last real token (``last``: found from the mask, so left or right padding alike), or the mean over real
    tokens (``mean``)."""
    mask = mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    if how != "last":
        raise ValueError(f"pool must be one of {POOLS}, got {how!r}")
    positions = torch.arange(mask.shape[1], dtype=hidden.dtype, device=hidden.device)
    last = (mask * (positions + 1)).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@dataclass(frozen=True)
class ActivationSettings:
    """Which hidden states (``layers``: indices into the model's hidden states, 0 = the embeddings), how
    pooled, whether each set is mean-centred, the energy fractions, and batching."""

    layers: tuple[int, ...] = ()
    etas: tuple[float, ...] = ACTIVATION_ETAS
    pool: str = "last"
    center: bool = False
    batch_size: int = 16
    max_length: int = 256
    chat_template: bool = False


def collect(
    model: Any, tokenizer: Any, prompts: Sequence[str], settings: ActivationSettings
) -> dict[int, np.ndarray]:
    """Pooled hidden states (prompts × D, float64) of ``prompts`` at each of ``settings.layers``."""
    texts = [_render(tokenizer, p) for p in prompts] if settings.chat_template else list(prompts)
    device = next(model.parameters()).device
    states: dict[int, list[np.ndarray]] = {layer: [] for layer in settings.layers}
    with torch.inference_mode():
        for start in range(0, len(texts), settings.batch_size):
            batch = tokenizer(
                texts[start : start + settings.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=settings.max_length,
            ).to(device)
            hidden = model(**batch, output_hidden_states=True).hidden_states
            if max(settings.layers) >= len(hidden):
                have = f"hidden states 0-{len(hidden) - 1}"
                raise SubspaceError(f"--activation-layers: the model has {have}, got {max(settings.layers)}")
            for layer in settings.layers:
                pooled = pool(hidden[layer].float(), batch["attention_mask"], settings.pool)
                states[layer].append(pooled.to(torch.float64).cpu().numpy())
    return {layer: np.concatenate(chunks) for layer, chunks in states.items()}


def _render(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model's chat template presents a user turn (the prompt itself without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def activation_mso(
    states_a: dict[int, np.ndarray], states_b: dict[int, np.ndarray], settings: ActivationSettings, model: str
) -> list[dict[str, Any]]:
    """Rows (model, layer, η, k_a, k_b, D, MSO, baseline) of the overlap between the principal directions in
    R^D of the two prompt sets' pooled states (the left singular vectors of each set's D × n matrix)."""
    rows = []
    for layer in settings.layers:
        spectra = []
        for states in (states_a[layer], states_b[layer]):
            matrix = states - states.mean(0, keepdims=True) if settings.center else states
            spectra.append(spectrum(matrix.T, "full"))
        dim = spectra[0].dim
        for eta in settings.etas:
            ka, kb = energy_k(spectra[0].s, eta), energy_k(spectra[1].s, eta)
            if ka == 0 or kb == 0:
                continue
            value = mso(spectra[0].u[:, :ka], spectra[1].u[:, :kb])
            random = mso_random(ka, kb, dim)
            rows.append(
                {
                    "model": model,
                    "layer": layer,
                    "eta": eta,
                    "k_a": ka,
                    "k_b": kb,
                    "d": dim,
                    "mso": value,
                    "mso_random": random,
                    "ratio": value / random,
                }
            )
    return rows
