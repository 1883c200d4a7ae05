"""Safety-subspace analysis of checkpoints BASE → ALIGNED → TUNED…: do the directions an alignment update uses
overlap the directions of useful and of harmful fine-tunes more than random subspaces would, do the
activations of two prompt sets share directions, and what do fine-tunes become when projected onto or away
from the alignment update's top directions. See docs/safety-subspaces.md."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from incentive.analysis.subspace_activations import (
    ACTIVATION_ETAS,
    ActivationSettings,
    activation_mso,
    collect,
    pool,
    read_prompts,
)
from incentive.analysis.subspace_checkpoints import (
    Checkpoint,
    check_compatible,
    open_checkpoint,
    stored,
    write_checkpoint,
)
from incentive.analysis.subspace_errors import SubspaceError
from incentive.analysis.subspace_linalg import (
    Spectrum,
    as_matrix,
    energy_basis,
    energy_k,
    haar_basis,
    mso,
    mso_random,
    mso_random_sampled,
    rounding_floor,
    spectrum,
    top_k,
)
from incentive.analysis.subspace_mso import ETAS, MsoSettings, Update, in_memory, stacked_matrix, update_mso
from incentive.analysis.subspace_projection import Diagnostics, ProjectionPlan, project_tensor, project_update
from incentive.analysis.subspace_report import activation_lines, levels_of, summary_lines
from incentive.analysis.subspace_select import Group, Selection, groups, layer_of, parse_layers

__all__ = [
    "ACTIVATION_ETAS",
    "ActivationSettings",
    "ETAS",
    "MsoSettings",
    "ProjectionPlan",
    "Request",
    "SubspaceError",
    "Update",
    "activation_lines",
    "activation_mso",
    "analyze",
    "as_matrix",
    "energy_basis",
    "energy_k",
    "haar_basis",
    "in_memory",
    "labels_for",
    "load",
    "mso",
    "mso_random",
    "mso_random_sampled",
    "pool",
    "project_checkpoint",
    "project_update",
    "spectrum",
    "summary_lines",
    "top_k",
    "update_mso",
]

ALIGNMENT = "alignment"
"""The label of the update ALIGNED − BASE; each TUNED update is TUNED − ALIGNED."""


@dataclass(frozen=True)
class Request:
    """One analysis: the checkpoints, which tensors, how subspaces are chosen, and the optional activation and
    projection experiments (layer specs stay text until the model's depth is known)."""

    base: str
    aligned: str
    tuned: tuple[str, ...]
    out: Path
    labels: tuple[str, ...] | None = None
    mso: MsoSettings = MsoSettings()
    tensors: str | None = None
    layers: str | None = None
    vectors: bool = False
    granularity: str = "tensor"
    activations: tuple[str, str] | None = None
    activation_layers: str = "0.65-0.9"
    activation: ActivationSettings = ActivationSettings()
    max_prompts: int | None = None
    projection: ProjectionPlan | None = None
    write: Path | None = None


@dataclass
class Loaded:
    """The opened checkpoints, the TUNED labels and the tensor selection."""

    base: Checkpoint
    aligned: Checkpoint
    tuned: dict[str, Checkpoint]
    selection: Selection

    def all(self) -> dict[str, Checkpoint]:
        """Every checkpoint by the name the activation results use."""
        return {"base": self.base, "aligned": self.aligned, **self.tuned}


def labels_for(specs: Sequence[str], given: Sequence[str] | None) -> list[str]:
    """Names of the TUNED updates: ``given``, or each path's folder name (a checkpoint's ``policy`` folder by
    its checkpoint's), made unique and never ``alignment``."""
    if given is not None:
        if len(given) != len(specs) or len(set(given)) != len(given) or ALIGNMENT in given:
            raise SubspaceError(
                f"--labels needs {len(specs)} distinct names other than '{ALIGNMENT}', one per TUNED; "
                f"got {list(given)}"
            )
        return list(given)
    labels: list[str] = []
    for spec in specs:
        path = Path(spec.rstrip("/"))
        name = path.parent.name if path.name == "policy" and path.parent.name else path.name
        name = name or spec
        candidate, n = name, 2
        while candidate in labels or candidate == ALIGNMENT:
            candidate, n = f"{name}-{n}", n + 1
        labels.append(candidate)
    return labels


def load(request: Request) -> Loaded:
    """Open and check the checkpoints and resolve the tensor selection (fails with a SubspaceError)."""
    base = open_checkpoint(request.base, "BASE")
    aligned = open_checkpoint(request.aligned, "ALIGNED")
    labels = labels_for(request.tuned, request.labels)
    specs = zip(labels, request.tuned, strict=True)
    tuned = {label: open_checkpoint(spec, f"TUNED {label}") for label, spec in specs}
    check_compatible([base, aligned, *tuned.values()])
    layers = None
    if request.layers is not None:
        depth = aligned.num_layers
        if depth is None:
            raise SubspaceError("--layers: the model's config names no number of layers")
        layers = frozenset(parse_layers(request.layers, depth))
    return Loaded(base, aligned, tuned, Selection(request.tensors, layers, request.vectors))


def stored_eps(checkpoints: Sequence[Checkpoint], name: str) -> float:
    """The machine epsilon of the coarsest precision tensor ``name`` is stored in among ``checkpoints``."""
    return max(torch.finfo(c.dtypes[name]).eps for c in checkpoints)


def _norm(arrays: Sequence[np.ndarray]) -> float:
    """The Frobenius norm of the arrays taken together."""
    return float(np.sqrt(sum(float(np.vdot(a, a)) for a in arrays)))


def _ordered(names: Sequence[str]) -> list[str]:
    """Tensor names by layer, then name (non-layer tensors first), not the file's alphabetical order."""
    return sorted(names, key=lambda n: (layer_of(n) if layer_of(n) is not None else -1, n))


def weight_overlap(loaded: Loaded, request: Request) -> dict[str, Any]:
    """The weight-update MSO over the selected tensors, read one group at a time from the checkpoints."""
    aligned = loaded.aligned
    names = _ordered(
        [n for n, shape in aligned.shapes.items() if loaded.selection.wants(n, shape, aligned.is_float(n))]
    )
    if not names:
        raise SubspaceError("no tensor matches the selection (--tensors, --layers, --vectors)")

    def updates(group: Group) -> dict[str, Update]:
        middle = [aligned.array(n) for n in group.members]
        ends = {ALIGNMENT: (loaded.base, [loaded.base.array(n) for n in group.members])}
        ends.update({label: (c, [c.array(n) for n in group.members]) for label, c in loaded.tuned.items()})
        out = {}
        for label, (checkpoint, arrays) in ends.items():
            pairs = list(zip(middle, arrays, strict=True))
            signed = [m - a if label == ALIGNMENT else a - m for m, a in pairs]
            eps = max(stored_eps([aligned, checkpoint], n) for n in group.members)
            noise = rounding_floor(eps, _norm(middle), _norm(arrays))
            out[label] = Update(stacked_matrix(signed), noise)
        return out

    return update_mso(groups(aligned.shapes, names, request.granularity), updates, request.mso)


def activation_overlap(loaded: Loaded, request: Request) -> dict[str, Any]:
    """Activation MSO of the two prompt sets in every checkpoint, at the requested hidden states."""
    from incentive.models import load_tokenizer
    from incentive.training.policy import load_model_for_eval

    assert request.activations is not None
    prompts_a = read_prompts(request.activations[0], request.max_prompts)
    prompts_b = read_prompts(request.activations[1], request.max_prompts)
    depth = loaded.aligned.num_layers
    if depth is None:
        raise SubspaceError("--activations: the model's config names no number of layers")
    layers = parse_layers(request.activation_layers, depth, "--activation-layers", hidden_states=True)
    settings = replace(request.activation, layers=tuple(layers))
    rows: list[dict[str, Any]] = []
    for name, checkpoint in loaded.all().items():
        model = load_model_for_eval(str(checkpoint.path))
        tokenizer = load_tokenizer(str(checkpoint.root))
        states_a = collect(model, tokenizer, prompts_a, settings)
        states_b = collect(model, tokenizer, prompts_b, settings)
        del model
        rows += activation_mso(states_a, states_b, settings, name)
    return {
        "prompts": {"a": request.activations[0], "b": request.activations[1]},
        "prompt_counts": {"a": len(prompts_a), "b": len(prompts_b)},
        "settings": asdict(settings),
        "rows": rows,
    }


def project_checkpoint(
    loaded: Loaded, label: str, plan: ProjectionPlan, cache: dict[str, Spectrum] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """TUNED ``label`` projected by ``plan`` (the selected tensors; the rest as fine-tuned), as tensors in
    ALIGNED's stored dtypes, and the diagnostics. A ``cache`` dict keeps each alignment update's full SVD for
    the next call (memory: about the weights' size in float64)."""
    aligned, tuned = loaded.aligned, loaded.tuned[label]
    diagnostics = Diagnostics()
    tensors: dict[str, torch.Tensor] = {}
    kept = 0
    for name in _ordered(list(aligned.shapes)):
        if loaded.selection.wants(name, aligned.shapes[name], aligned.is_float(name), overlap=False):
            eps = stored_eps([loaded.base, aligned], name)
            weights = (loaded.base.array(name), aligned.array(name), tuned.array(name))
            weight = project_tensor(name, *weights, plan, diagnostics, eps, cache)
        else:
            weight, kept = tuned.array(name), kept + 1
        tensors[name] = stored(aligned, name, weight)
    info = {"plan": plan.describe(), "tensors_as_tuned": kept, **diagnostics.summary()}
    return tensors, {**info, "tensors": diagnostics.tensors}


def projection(loaded: Loaded, request: Request) -> dict[str, dict[str, Any]]:
    """Each TUNED checkpoint projected by the request's plan, written under ``request.write/<label>`` when
    asked; the diagnostics by label."""
    assert request.projection is not None
    results = {}
    for label in loaded.tuned:
        tensors, info = project_checkpoint(loaded, label, request.projection)
        written = None
        if request.write is not None:
            written = str(write_checkpoint(request.write / label, tensors, loaded.aligned))
        results[label] = {"written": written, **info}
    return results


def analyze(request: Request) -> dict[str, Any]:
    """Run the analysis ``request`` asks for and write its JSON files and plots under ``request.out``;
    returns the paths written (``written``, by name) and the results (``overlap``, ``activations``,
    ``projection``)."""
    from incentive.analysis.subspace_plots import plot_activations, plot_layers, plot_levels, plot_projection

    loaded = load(request)
    request.out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    overlap = weight_overlap(loaded, request)
    record = {
        "checkpoints": {name: c.describe() for name, c in loaded.all().items()},
        "updates": {ALIGNMENT: "aligned - base", **{label: f"{label} - aligned" for label in loaded.tuned}},
        "settings": _settings(request),
        **overlap,
    }
    written["overlap"] = _write_json(request.out / "subspaces.json", record)
    results: dict[str, Any] = {"written": written, "overlap": overlap}
    if overlap["summary"]:
        written["levels_plot"] = plot_levels(overlap["summary"], request.out / "mso_levels.png")
        levels = levels_of(overlap["summary"])
        eta, k = levels[len(levels) // 2]
        level = {"eta": eta, "k": k}
        if any(s["by_layer"] for s in overlap["summary"]):
            written["layers_plot"] = plot_layers(overlap["summary"], level, request.out / "mso_layers.png")
    if request.activations is not None:
        activations = results["activations"] = activation_overlap(loaded, request)
        written["activations"] = _write_json(request.out / "activations.json", activations)
        if activations["rows"]:
            plot = request.out / "activation_mso.png"
            written["activations_plot"] = plot_activations(activations["rows"], plot)
    if request.projection is not None:
        projected = results["projection"] = projection(loaded, request)
        written["projection"] = _write_json(request.out / "projection.json", projected)
        written["projection_plot"] = plot_projection(projected, request.out / "projection_energy.png")
    return results


def _settings(request: Request) -> dict[str, Any]:
    """The overlap settings as the output JSON records them."""
    return {
        "etas": None if request.mso.k is not None else list(request.mso.etas),
        "k": request.mso.k,
        "svd": request.mso.svd,
        "random_samples": request.mso.random_samples,
        "seed": request.mso.seed,
        "tensors": request.tensors,
        "layers": request.layers,
        "vectors": request.vectors,
        "granularity": request.granularity,
    }


def _write_json(path: Path, record: Any) -> Path:
    path.write_text(json.dumps(record, indent=1, allow_nan=False))
    return path
