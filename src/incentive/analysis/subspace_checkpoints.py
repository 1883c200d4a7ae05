"""Checkpoints as tensors for the subspace analysis: a Hugging Face folder of full weights (safetensors, one
file or sharded), a PEFT LoRA adapter merged onto its base (W = W_base + scale · B·A, in float64), or a model
name the toolkit knows; read one tensor at a time, and projected weights written back as a folder ``incentive
eval`` loads."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from incentive.analysis.subspace_errors import SubspaceError

PEFT_PREFIX = "base_model.model."
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
"""Files not copied beside written weights (weights of the source, in any format)."""
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """One model's stored tensors by name, read on demand as float64 arrays (merged for an adapter)."""

    role: str
    spec: str
    path: Path
    kind: str
    root: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float64 array (the effective weight for an adapter)."""
        raise NotImplementedError

    def is_float(self, name: str) -> bool:
        """Whether ``name`` holds floating-point values (integer buffers have no subspace)."""
        return self.dtypes[name].is_floating_point

    @property
    def num_layers(self) -> int | None:
        """Decoder layers, from the config (None where it names none)."""
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.config.get(key), int):
                return int(self.config[key])
        return None

    def describe(self) -> dict[str, Any]:
        """What the output JSON records of this checkpoint."""
        return {"spec": self.spec, "path": str(self.path), "kind": self.kind, "tensors": len(self.shapes)}


class FullCheckpoint(Checkpoint):
    """A folder with config.json and safetensors weights (``model.safetensors`` or shards with an index)."""

    def __init__(self, role: str, spec: str, path: Path) -> None:
        self.role, self.spec, self.path, self.kind, self.root = role, spec, path, "full", path
        self.config = json.loads((path / "config.json").read_text())
        self._file_of = _weight_files(role, path)
        self.shapes, self.dtypes = {}, {}
        for file in sorted(set(self._file_of.values())):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - a safetensors handle is not a mapping
                    if self._file_of[name] != file:
                        continue
                    piece = handle.get_slice(name)
                    self.shapes[name] = tuple(piece.get_shape())
                    self.dtypes[name] = _DTYPES.get(piece.get_dtype(), torch.int64)
        embedding = next((n for n in self.shapes if n.endswith("embed_tokens.weight")), None)
        head = self.shapes.get("lm_head.weight")
        if self.config.get("tie_word_embeddings") and embedding and head == self.shapes[embedding]:
            del self.shapes["lm_head.weight"], self.dtypes["lm_head.weight"]  # a tied copy, stored or not

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored."""
        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def array(self, name: str) -> np.ndarray:
        return self.tensor(name).to(torch.float64).numpy()


@dataclass
class LoraFactors:
    """The adapter of one weight: ``delta`` = scale · B·A (transposed for an embedding or fan_in_fan_out)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool

    def delta(self) -> np.ndarray:
        """scale · B·A in float64."""
        product = self.b.to(torch.float64).numpy() @ self.a.to(torch.float64).numpy()
        return self.scale * (product.T if self.transpose else product)


@dataclass
class _AdapterParts:
    """An adapter file's content: LoRA factors ("A", "B") by the weight they change, which of those weights
    are embeddings (stored transposed), and full replacement tensors."""

    factors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    embeddings: set[str] = field(default_factory=set)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)


class LoraCheckpoint(Checkpoint):
    """A PEFT LoRA adapter folder merged onto its base model: every adapted weight is W_base + scale · B·A;
    the adapter's full copies (``modules_to_save``, saved embedding layers) replace the base's tensors."""

    def __init__(self, role: str, spec: str, path: Path, base: FullCheckpoint) -> None:
        self.role, self.spec, self.path, self.kind, self.root = role, spec, path, "lora", base.root
        self.base = base
        self.config = base.config
        self.shapes, self.dtypes = dict(base.shapes), dict(base.dtypes)
        settings = json.loads((path / "adapter_config.json").read_text())
        if settings.get("use_dora"):
            raise SubspaceError(f"{role} {spec}: DoRA adapters are not supported (only plain LoRA)")
        weights = path / "adapter_model.safetensors"
        if not weights.exists():
            raise SubspaceError(f"{role} {spec}: no adapter_model.safetensors in the adapter folder")
        parts = _adapter_parts(role, spec, weights)
        self.replaced = parts.replaced
        for name, tensor in self.replaced.items():
            self._check_shape(name, tuple(tensor.shape))
        self.factors = {
            name: self._factors(name, pair, name in parts.embeddings, settings)
            for name, pair in parts.factors.items()
        }

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.shapes:
            raise SubspaceError(f"{self.role} {self.spec}: the adapter changes {name}, which its base lacks")
        if shape != self.shapes[name]:
            raise SubspaceError(
                f"{self.role} {self.spec}: the adapter's {name} is {list(shape)} but the base's is "
                f"{list(self.shapes[name])}"
            )

    def _factors(
        self, name: str, pair: dict[str, torch.Tensor], embedding: bool, settings: dict[str, Any]
    ) -> LoraFactors:
        """The factors and scale of weight ``name``: alpha (or its ``alpha_pattern`` entry) over the rank, or
        over its square root for rsLoRA; the rank is read from the factors' shapes."""
        if set(pair) != {"A", "B"} or pair["A"].ndim != 2 or pair["B"].ndim != 2:
            raise SubspaceError(f"{self.role} {self.spec}: the adapter of {name} lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        module = name.removesuffix(".weight")
        patterns = settings.get("alpha_pattern") or {}
        alpha = float(_pattern_value(patterns, module, settings.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
        transpose = embedding or bool(settings.get("fan_in_fan_out"))
        factors = LoraFactors(a, b, scale, transpose)
        rows, cols = b.shape[0], a.shape[1]
        self._check_shape(name, (cols, rows) if transpose else (rows, cols))
        return factors

    def array(self, name: str) -> np.ndarray:
        if name in self.replaced:
            weight = self.replaced[name].to(torch.float64).numpy()
        else:
            weight = self.base.array(name)
        factors = self.factors.get(name)
        return weight if factors is None else weight + factors.delta()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "base": self.base.describe(),
            "adapted": len(self.factors),
            "replaced": sorted(self.replaced),
        }


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _weight_files(role: str, path: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file that holds it."""
    if (path / "model.safetensors").exists():
        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), path / "model.safetensors")
    if (path / INDEX).exists():
        weight_map = json.loads((path / INDEX).read_text()).get("weight_map", {})
        return {name: path / file for name, file in weight_map.items()}
    found = ", ".join(sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_FILES)) or "none"
    raise SubspaceError(
        f"{role} {path}: no safetensors weights (model.safetensors or {INDEX}); weight files found: {found}"
    )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """A module's entry in PEFT's ``alpha_pattern``: the first key matching the end of its name."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


_FACTOR = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<emb>[AB]))$")


def _adapter_parts(role: str, spec: str, weights: Path) -> _AdapterParts:
    """The adapter file's LoRA factors by the weight they change, and its full replacement tensors."""
    parts = _AdapterParts()
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not a mapping
            name = key.removeprefix(PEFT_PREFIX)
            match = _FACTOR.match(name)
            if match:
                target = f"{match['module']}.weight"
                parts.factors.setdefault(target, {})[match["ab"] or match["emb"]] = handle.get_tensor(key)
                if match["emb"]:
                    parts.embeddings.add(target)
            elif "lora_" in name:
                raise SubspaceError(f"{role} {spec}: unsupported adapter tensor {key} (plain LoRA only)")
            else:
                parts.replaced[name.replace(".base_layer.", ".")] = handle.get_tensor(key)
    return parts


def open_checkpoint(spec: str, role: str) -> Checkpoint:
    """The checkpoint ``spec`` names: a full-weights folder, a LoRA adapter folder, a toolkit checkpoint
    folder holding ``policy/``, or a model name (``embedded``, ``tiny-random``, a locally cached Hugging Face
    id)."""
    path = Path(spec).expanduser()
    if not path.exists():
        if "/" in spec and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
            raise SubspaceError(f"{role} {spec}: no such file or directory")
        from incentive.models.loading import resolve

        path = resolve(spec)
    path = _policy_folder(path)
    if not path.is_dir() or not _is_model_dir(path):
        raise SubspaceError(
            f"{role} {spec}: not a checkpoint (a folder with config.json and weights, or a LoRA adapter "
            "folder with adapter_config.json)"
        )
    if (path / "adapter_config.json").exists():
        from incentive.models.loading import ModelLoadError, resolve
        from incentive.models.lora import adapter_base

        base_spec = adapter_base(path) or "embedded"
        try:
            base_path = resolve(base_spec)
        except ModelLoadError as err:
            raise SubspaceError(f"{role} {spec}: the adapter's base model cannot be found: {err}") from err
        return LoraCheckpoint(role, spec, path, _open_full(f"{role}'s base", base_spec, base_path))
    return _open_full(role, spec, path)


def _open_full(role: str, spec: str, path: Path) -> FullCheckpoint:
    if (path / "adapter_config.json").exists():
        raise SubspaceError(f"{role} {spec}: an adapter whose base is itself an adapter is not supported")
    return FullCheckpoint(role, spec, path)


def _policy_folder(path: Path) -> Path:
    """The model folder in a toolkit checkpoint folder (its ``policy/``) or run folder (its latest
    checkpoint's); any other path as it is."""
    if not path.is_dir() or _is_model_dir(path):
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        path = path / "checkpoints" / latest.read_text().strip()
    return path / "policy" if (path / "policy").is_dir() else path


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def check_compatible(checkpoints: list[Checkpoint]) -> None:
    """Refuse checkpoints of different architectures: another model type, other tensor names or shapes."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        pair = f"{first.role} ({first.spec}) and {other.role} ({other.spec})"
        kinds = (first.config.get("model_type"), other.config.get("model_type"))
        if kinds[0] != kinds[1]:
            raise SubspaceError(f"{pair} are different architectures: model_type {kinds[0]} vs {kinds[1]}")
        only_first = sorted(set(first.shapes) - set(other.shapes))
        only_other = sorted(set(other.shapes) - set(first.shapes))
        if only_first or only_other:
            name, owner = (only_first[0], first.role) if only_first else (only_other[0], other.role)
            count = len(only_first) + len(only_other)
            raise SubspaceError(
                f"{pair} are different architectures: {count} tensors are not in both, e.g. {name} (only in "
                f"{owner})"
            )
        for name, shape in first.shapes.items():
            if other.shapes[name] != shape:
                shapes = f"{list(shape)} vs {list(other.shapes[name])}"
                raise SubspaceError(f"{pair} are different architectures: {name} is {shapes}")


def stored(like: Checkpoint, name: str, array: np.ndarray) -> torch.Tensor:
    """``array`` as tensor ``name`` of ``like`` is stored (its dtype), ready for :func:`write_checkpoint`."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(like.dtypes[name]).contiguous()


def write_checkpoint(out: Path, tensors: dict[str, torch.Tensor], like: Checkpoint) -> Path:
    """Write ``tensors`` (every tensor of ``like``) as a full-weights folder with the config, generation
    settings and tokenizer files of ``like``'s folders, loadable by ``incentive eval --model OUT``."""
    out.mkdir(parents=True, exist_ok=True)
    sources = [like.root] + ([like.path] if like.path != like.root else [])
    for folder in sources:
        for file in sorted(folder.iterdir()):
            weights = file.suffix in WEIGHT_FILES or file.name.endswith(".index.json")
            if file.is_file() and not weights and not file.name.startswith("adapter_"):
                shutil.copyfile(file, out / file.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
