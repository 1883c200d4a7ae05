"""Safety-subspace analysis (``incentive analyze subspaces``): the overlap maths on constructed matrices with
known answers, the projection modes and diagnostics, LoRA merging, activation pooling, and the command end to
end on tiny-random checkpoints made here (full weights perturbed by low-rank updates from fixed seeds, and a
LoRA adapter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from incentive.analysis.subspace_checkpoints import open_checkpoint
from incentive.analysis.subspace_errors import SubspaceError
from incentive.analysis.subspace_linalg import (
    as_matrix,
    energy_basis,
    energy_k,
    haar_basis,
    mso,
    mso_random,
    mso_random_sampled,
    spectrum,
    top_k,
)
from incentive.analysis.subspace_mso import MsoSettings, in_memory, update_mso
from incentive.analysis.subspace_projection import (
    Diagnostics,
    ProjectionPlan,
    project_update,
    vector_parallel,
)
from incentive.analysis.subspace_select import Selection, groups, parse_layers
from incentive.analysis.subspaces import labels_for, pool
from incentive.cli import main


def axes(d: int, *indices: int) -> np.ndarray:
    """The orthonormal basis of the given coordinate axes of R^d."""
    return np.eye(d)[:, list(indices)]


def with_singular_vectors(m: int, n: int, s: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A matrix U diag(s) Vᵀ from random orthonormal U and V, and that U."""
    rng = np.random.default_rng(seed)
    u = haar_basis(m, len(s), rng)
    v = haar_basis(n, len(s), rng)
    return u @ np.diag(s) @ v.T, u


# --- MSO and its baseline ---


def test_mso_of_a_subspace_with_itself_is_one_and_of_orthogonal_ones_zero() -> None:
    q = haar_basis(10, 3, np.random.default_rng(0))
    assert mso(q, q) == pytest.approx(1.0, abs=1e-12)
    assert mso(axes(6, 0, 1), axes(6, 2, 3, 4)) == 0.0


def test_mso_is_one_when_the_smaller_subspace_lies_in_the_larger() -> None:
    small = axes(8, 1, 4)
    large = haar_basis(8, 2, np.random.default_rng(1))
    inside = np.linalg.qr(np.hstack([small, large]))[0]
    assert mso(small, inside) == pytest.approx(1.0, abs=1e-12)
    assert mso(inside, small) == pytest.approx(1.0, abs=1e-12)


def test_mso_of_a_line_at_45_degrees_is_one_half() -> None:
    diagonal = np.array([[1.0], [1.0], [0.0]]) / np.sqrt(2)
    assert mso(axes(3, 0), diagonal) == pytest.approx(0.5)


def test_the_analytic_random_baseline_is_max_k_over_d() -> None:
    assert mso_random(4, 10, 100) == pytest.approx(0.1)
    assert mso_random(10, 4, 100) == pytest.approx(0.1)
    assert mso_random(1, 1, 50) == pytest.approx(1 / 50)
    with pytest.raises(ValueError):
        mso_random(0, 3, 10)


def test_random_subspaces_overlap_k1_k2_over_d_within_three_standard_errors() -> None:
    k1, k2, d, samples = 3, 5, 20, 400
    rng = np.random.default_rng(7)
    values = [float(np.sum((haar_basis(d, k1, rng).T @ haar_basis(d, k2, rng)) ** 2)) for _ in range(samples)]
    mean, se = np.mean(values), np.std(values, ddof=1) / np.sqrt(samples)
    assert abs(mean - k1 * k2 / d) < 3 * se
    sampled, sampled_se = mso_random_sampled(k1, k2, d, samples, seed=3)
    assert abs(sampled - mso_random(k1, k2, d)) < 3 * sampled_se
    assert mso_random_sampled(k1, k2, d, 50, seed=3) == mso_random_sampled(k1, k2, d, 50, seed=3)


# --- principal directions ---


def test_energy_basis_picks_the_fewest_directions_holding_eta() -> None:
    matrix = np.diag([3.0, 1.0])
    assert energy_k(np.array([3.0, 1.0]), 0.9) == 1
    assert energy_k(np.array([3.0, 1.0]), 0.95) == 2
    basis, k = energy_basis(matrix, 0.9)
    assert k == 1 and mso(basis, axes(2, 0)) == pytest.approx(1.0)
    basis, k = energy_basis(matrix, 0.95)
    assert k == 2 and np.allclose(basis.T @ basis, np.eye(2))
    assert energy_k(np.zeros(3), 0.5) == 0


def test_top_k_directions_of_a_matrix_built_from_known_singular_vectors() -> None:
    matrix, u = with_singular_vectors(40, 30, [9.0, 7.0, 5.0, 0.5, 0.25], seed=2)
    spec = spectrum(matrix, "full")
    assert np.allclose(spec.s[:5], [9.0, 7.0, 5.0, 0.5, 0.25])
    assert spec.rank == 5
    top = top_k(spec, 3, "M")
    assert np.allclose(top.T @ top, np.eye(3))
    assert mso(top, u[:, :3]) == pytest.approx(1.0, abs=1e-10)
    assert mso(top, u[:, 3:]) == pytest.approx(0.0, abs=1e-10)
    randomized = spectrum(matrix, "lowrank", seed=5, q=3)
    assert randomized.method == "lowrank" and randomized.captured < 1
    assert mso(randomized.u, u[:, :3]) == pytest.approx(1.0, abs=1e-8)
    assert np.array_equal(spectrum(matrix, "lowrank", seed=5, q=3).u, randomized.u)


def test_k_above_the_rank_is_refused_naming_the_matrix() -> None:
    matrix, _ = with_singular_vectors(12, 10, [2.0, 1.0], seed=3)
    with pytest.raises(SubspaceError, match="k = 3 exceeds the rank 2 of tensor X"):
        top_k(spectrum(matrix), 3, "tensor X")


def test_reshape_rules_and_selection() -> None:
    assert as_matrix(np.zeros(5)).shape == (5, 1)
    assert as_matrix(np.zeros((4, 6))).shape == (4, 6)
    assert as_matrix(np.zeros((8, 3, 2, 2))).shape == (8, 12)
    chosen = Selection()
    assert chosen.wants("model.layers.0.mlp.up_proj.weight", (4, 6), True)
    assert not chosen.wants("model.layers.0.input_layernorm.weight", (4,), True)
    assert Selection(vectors=True).wants("model.layers.0.input_layernorm.weight", (4,), True)
    assert chosen.wants("model.layers.0.input_layernorm.weight", (4,), True, overlap=False)
    assert not chosen.wants("position_ids", (1, 8), False)
    layered = Selection(pattern="mlp", layers=frozenset({1}))
    assert layered.wants("model.layers.1.mlp.up_proj.weight", (4, 6), True)
    assert not layered.wants("model.layers.0.mlp.up_proj.weight", (4, 6), True)
    assert not layered.wants("model.layers.1.self_attn.q_proj.weight", (4, 6), True)


def test_layer_specs() -> None:
    assert parse_layers("0.65-0.9", 30) == list(range(19, 27))
    assert parse_layers("0.65-0.9", 2) == [1]
    assert parse_layers("0,3,5-7", 10) == [0, 3, 5, 6, 7]
    assert parse_layers("2", 2, hidden_states=True) == [2]
    for bad in ("9", "3-1", "a", "0.9-0.5"):
        with pytest.raises(SubspaceError, match="--layers"):
            parse_layers(bad, 4)


def test_layer_granularity_stacks_a_layers_tensors_of_one_column_count() -> None:
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.self_attn.k_proj.weight": (4, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 16),
        "lm_head.weight": (20, 8),
    }
    found = {g.name: g.members for g in groups(shapes, list(shapes), "layer")}
    assert found["model.layers.0 (8 columns)"] == (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    )
    assert found["model.layers.0 (16 columns)"] == ("model.layers.0.mlp.down_proj.weight",)
    assert found["lm_head.weight"] == ("lm_head.weight",)


def test_update_mso_on_known_updates() -> None:
    d = 12
    span = haar_basis(d, 3, np.random.default_rng(4))
    rng = np.random.default_rng(5)
    inside = span @ rng.standard_normal((3, 6))
    orthogonal_axes = np.linalg.qr(np.hstack([span, rng.standard_normal((d, 3))]))[0][:, 3:]
    outside = orthogonal_axes @ rng.standard_normal((3, 6))
    updates = {"x": {"w": inside}, "y": {"w": 2 * inside}, "z": {"w": outside}}
    updates["zero"] = {"w": np.zeros((d, 6))}
    result = update_mso(groups({"w": (d, 6)}, ["w"], "tensor"), in_memory(updates), MsoSettings(k=3))
    by_pair = {(r["a"], r["b"]): r for r in result["rows"]}
    assert by_pair[("x", "y")]["mso"] == pytest.approx(1.0)
    assert by_pair[("x", "z")]["mso"] == pytest.approx(0.0, abs=1e-12)
    assert by_pair[("x", "z")]["mso_random"] == pytest.approx(3 / d)
    assert result["skipped"] == [{"group": "w", "update": "zero", "reason": "zero update"}]
    assert {(s["a"], s["b"]) for s in result["summary"]} == set(by_pair)


# --- projection ---


def projection_case(inside: bool) -> tuple[dict[str, np.ndarray], ...]:
    """W_B, W_A, W_F of one 10 x 8 tensor whose alignment update has rank 3 and whose task update lies inside
    (or orthogonal to) the span of its top-3 directions."""
    alignment, u = with_singular_vectors(10, 8, [5.0, 3.0, 2.0], seed=8)
    rng = np.random.default_rng(9)
    other = np.linalg.qr(np.hstack([u, rng.standard_normal((10, 4))]))[0][:, 3:]
    task = (u if inside else other[:, :3]) @ rng.standard_normal((3, 8))
    base = rng.standard_normal((10, 8))
    return {"w": base}, {"w": base + alignment}, {"w": base + alignment + task}


@pytest.mark.parametrize("basis", ["topk", "randomk"])
def test_projection_of_an_update_inside_the_top_directions(basis: str) -> None:
    base, aligned, tuned = projection_case(inside=True)
    onto, info = project_update(base, aligned, tuned, ProjectionPlan("onto", basis, k=3))
    assert np.allclose(onto["w"], tuned["w"])
    assert info["energy_kept"] == pytest.approx(1.0) and info["cos_task_proj"] == pytest.approx(1.0)
    away, info = project_update(base, aligned, tuned, ProjectionPlan("away", basis, k=3))
    assert np.allclose(away["w"], aligned["w"])
    assert info["energy_kept"] == pytest.approx(0.0, abs=1e-20)


def test_projection_of_an_update_orthogonal_to_the_top_directions() -> None:
    base, aligned, tuned = projection_case(inside=False)
    onto, _ = project_update(base, aligned, tuned, ProjectionPlan("onto", k=3))
    assert np.allclose(onto["w"], aligned["w"])
    away, _ = project_update(base, aligned, tuned, ProjectionPlan("away", k=3))
    assert np.allclose(away["w"], tuned["w"])


def test_onto_plus_away_reconstructs_the_update_and_opposite_negates_onto() -> None:
    rng = np.random.default_rng(10)
    base = {"w": rng.standard_normal((9, 7)), "b": rng.standard_normal(9)}
    aligned = {name: w + rng.standard_normal(w.shape) for name, w in base.items()}
    tuned = {name: w + rng.standard_normal(w.shape) for name, w in aligned.items()}
    parts = {
        mode: project_update(base, aligned, tuned, ProjectionPlan(mode, basis, k=2, seed=1))[0]
        for mode in ("onto", "away", "opposite")
        for basis in ["random"]
    }
    for name in base:
        update = tuned[name] - aligned[name]
        together = (parts["onto"][name] - aligned[name]) + (parts["away"][name] - aligned[name])
        assert np.allclose(together, update)
        assert np.allclose(parts["opposite"][name] - aligned[name], -(parts["onto"][name] - aligned[name]))


def test_random_controls_are_seeded_and_orthonormal() -> None:
    base, aligned, tuned = projection_case(inside=True)
    first, _ = project_update(base, aligned, tuned, ProjectionPlan("onto", "random", k=3, seed=4))
    again, _ = project_update(base, aligned, tuned, ProjectionPlan("onto", "random", k=3, seed=4))
    other, _ = project_update(base, aligned, tuned, ProjectionPlan("onto", "random", k=3, seed=5))
    assert np.array_equal(first["w"], again["w"]) and not np.allclose(first["w"], other["w"])
    q = haar_basis(30, 4, np.random.default_rng(0))
    assert np.allclose(q.T @ q, np.eye(4))


def test_a_cache_of_alignment_spectra_gives_the_same_projection() -> None:
    base, aligned, tuned = projection_case(inside=False)
    cache: dict = {}
    for basis in ("topk", "randomk", "random"):
        plan = ProjectionPlan("away", basis, k=2, seed=3)
        cached, _ = project_update(base, aligned, tuned, plan, cache=cache)
        assert np.allclose(cached["w"], project_update(base, aligned, tuned, plan)[0]["w"])
    assert list(cache) == ["w"]


def test_a_vector_is_projected_on_the_alignment_vector_and_a_zero_one_gives_zero() -> None:
    u, v = np.array([2.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])
    assert np.allclose(vector_parallel(u, v), [2.0, 0.0, 0.0])
    assert np.array_equal(vector_parallel(u, np.zeros(3)), np.zeros(3))
    base, aligned = {"b": np.zeros(3)}, {"b": np.zeros(3)}
    out, info = project_update(base, aligned, {"b": u}, ProjectionPlan("onto", k=1))
    assert np.array_equal(out["b"], np.zeros(3)) and info["cos_task_align"] is None


def test_a_zero_alignment_update_projects_a_matrix_onto_nothing() -> None:
    base = {"w": np.ones((4, 3))}
    out, info = project_update(base, base, {"w": np.full((4, 3), 2.0)}, ProjectionPlan("away", k=2))
    assert np.allclose(out["w"], 2.0) and info["tensors"][0]["k"] == 0


def test_diagnostics_cosine_uses_the_norms_of_both_updates() -> None:
    diagnostics = Diagnostics()
    u, v = np.array([3.0, 4.0]), np.array([1.0, 0.0])
    diagnostics.add("b", u, v, u, None)
    summary = diagnostics.summary()
    assert summary["energy_kept"] == 1.0 and summary["cos_task_proj"] == pytest.approx(1.0)
    assert summary["cos_task_align"] == pytest.approx(3 / 5)


def test_frac_sets_k_from_the_smaller_side_and_k_above_it_is_refused() -> None:
    base, aligned, tuned = projection_case(inside=True)
    _, info = project_update(base, aligned, tuned, ProjectionPlan("onto", frac=0.25))
    assert info["tensors"][0]["k"] == 2
    with pytest.raises(SubspaceError, match="exceeds min"):
        project_update(base, aligned, tuned, ProjectionPlan("onto", k=9))
    with pytest.raises(SubspaceError, match="exceeds the rank 3"):
        project_update(base, aligned, tuned, ProjectionPlan("onto", k=4))


# --- activations ---


def test_last_token_pooling_ignores_padding_on_either_side() -> None:
    torch.manual_seed(0)
    states = torch.randn(1, 3, 4)
    for pad in (0, 2, 5):
        right = torch.cat([states, torch.randn(1, pad, 4)], 1)
        mask = torch.tensor([[1] * 3 + [0] * pad])
        assert torch.equal(pool(right, mask, "last")[0], states[0, 2])
        left = torch.cat([torch.randn(1, pad, 4), states], 1)
        assert torch.equal(pool(left, mask.flip(1), "last")[0], states[0, 2])
        assert torch.allclose(pool(right, mask, "mean")[0], states[0].mean(0))


# --- checkpoints and the command ---

RANK = 2
"""Rank of the perturbations the test checkpoints get (low, so subspaces are exact and small)."""


def low_rank(shape: tuple[int, ...], generator: torch.Generator, scale: float = 0.05) -> torch.Tensor:
    a = torch.randn(shape[0], RANK, generator=generator)
    b = torch.randn(RANK, shape[1], generator=generator)
    return scale * a @ b


def write_full(folder: Path, source: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copyfile(file, folder / file.name)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(folder / "model.safetensors"), {"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base (tiny-random), aligned (rank-2 updates of every layer matrix), useful (new rank-2 updates), echo
    (aligned + half the alignment update: the same directions) and lora (an adapter on aligned, q/v only)."""
    from incentive.models.loading import tiny_dir

    root = tmp_path_factory.mktemp("subspaces")
    source = tiny_dir()
    base = load_file(str(source / "model.safetensors"))
    generator = torch.Generator().manual_seed(11)
    matrices = [n for n, t in base.items() if t.ndim == 2 and "layers." in n]
    alignment = {n: low_rank(base[n].shape, generator) for n in matrices}
    aligned = {n: t + alignment.get(n, 0) for n, t in base.items()}
    useful = {n: t + (low_rank(t.shape, generator) if n in alignment else 0) for n, t in aligned.items()}
    echo = {n: t + 0.5 * alignment.get(n, 0) for n, t in aligned.items()}
    paths = {
        "base": write_full(root / "base", source, base),
        "aligned": write_full(root / "aligned", source, aligned),
        "useful": write_full(root / "useful", source, useful),
        "echo": write_full(root / "echo", source, echo),
    }
    paths["lora"] = write_lora(root / "lora", paths["aligned"])
    return paths


def write_lora(folder: Path, base: Path) -> Path:
    """A rank-4 LoRA adapter on q_proj and v_proj of ``base`` with non-zero B (peft starts B at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(folder)
    return folder


def test_a_lora_checkpoint_is_its_base_plus_scaled_b_times_a(checkpoints: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = open_checkpoint(str(checkpoints["lora"]), "TUNED")
    aligned = open_checkpoint(str(checkpoints["aligned"]), "ALIGNED")
    adapter = load_file(str(checkpoints["lora"] / "adapter_model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    a = adapter["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].double().numpy()
    b = adapter["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].double().numpy()
    assert np.allclose(lora.array(name) - aligned.array(name), (8 / 4) * b @ a, rtol=0, atol=1e-12)
    untouched = "model.layers.1.mlp.up_proj.weight"
    assert np.array_equal(lora.array(untouched), aligned.array(untouched))
    base_model = AutoModelForCausalLM.from_pretrained(checkpoints["aligned"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(base_model, checkpoints["lora"]).merge_and_unload().state_dict()
    assert np.allclose(lora.array(name), merged[name].double().numpy(), atol=1e-6)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["analyze", "subspaces", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_measures_overlaps_and_writes_json_and_plots(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = {k: str(v) for k, v in checkpoints.items()}
    out = tmp_path / "out"
    args = [c["base"], c["aligned"], c["useful"], c["echo"], c["lora"], "--eta", "0.5", "0.99"]
    args += ["--out", str(out)]
    code, printed, err = run_cli(args + ["--random-samples", "20"], capsys)
    assert code == 0, err
    assert "alignment vs echo" in printed
    record = json.loads((out / "subspaces.json").read_text())
    assert record["checkpoints"]["lora"]["kind"] == "lora"
    rows = record["rows"]
    assert {(r["a"], r["b"]) for r in rows} == {
        ("alignment", "useful"),
        ("alignment", "echo"),
        ("alignment", "lora"),
        ("useful", "echo"),
        ("useful", "lora"),
        ("echo", "lora"),
    }
    echo_rows = [r for r in rows if (r["a"], r["b"]) == ("alignment", "echo")]
    assert len(echo_rows) == 2 * 14  # 2 layers x 7 matrices, at 2 energy fractions
    assert all(r["mso"] == pytest.approx(1.0, abs=1e-4) for r in echo_rows)
    for r in rows:
        assert 0 <= r["mso"] <= 1 + 1e-9
        assert r["mso_random"] == pytest.approx(max(r["k_a"], r["k_b"]) / r["d"])
        assert r["k_a"] <= RANK or r["a"] == "lora" or r["b"] == "lora"
        assert "mso_random_sampled" in r
    lora_groups = {r["group"] for r in rows if r["b"] == "lora"}
    assert lora_groups == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv"}
    assert any(s["update"] == "lora" and s["reason"] == "zero update" for s in record["skipped"])
    summary = {(s["a"], s["b"], s["eta"]): s for s in record["summary"]}
    assert summary[("alignment", "echo", 0.5)]["mso_mean"] == pytest.approx(1.0, abs=1e-4)
    assert summary[("alignment", "useful", 0.5)]["mso_mean"] < 0.5
    assert set(summary[("alignment", "useful", 0.99)]["by_layer"]) == {"0", "1"}
    for plot in ("mso_levels.png", "mso_layers.png"):
        assert (out / plot).stat().st_size > 1000
    again = tmp_path / "again"
    assert run_cli(args[:-1] + [str(again), "--random-samples", "20"], capsys)[0] == 0
    assert json.loads((again / "subspaces.json").read_text())["rows"] == rows


def test_the_command_projects_and_writes_checkpoints_eval_can_load(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from incentive.training.policy import load_model_for_eval

    c = {k: str(v) for k, v in checkpoints.items()}
    write = tmp_path / "projected"
    args = [c["base"], c["aligned"], c["echo"], c["useful"], "--project", "away", "--k", str(RANK)]
    args += ["--tensors", "layers", "--write", str(write), "--out", str(tmp_path)]
    code, printed, err = run_cli(args, capsys)
    assert code == 0, err
    assert "energy kept" in printed
    projection = json.loads((tmp_path / "projection.json").read_text())
    assert projection["echo"]["energy_kept"] == pytest.approx(0.0, abs=1e-6)
    assert projection["echo"]["cos_task_align"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < projection["useful"]["energy_kept"] <= 1
    aligned = load_file(str(checkpoints["aligned"] / "model.safetensors"))
    echo_away = load_file(str(write / "echo" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(echo_away[name], aligned[name], atol=1e-6)
    model = load_model_for_eval(str(write / "useful"))
    useful = load_file(str(checkpoints["useful"] / "model.safetensors"))
    weight = dict(model.named_parameters())["model.embed_tokens.weight"]
    assert torch.equal(weight, useful["model.embed_tokens.weight"])
    assert (tmp_path / "projection_energy.png").exists()


def test_the_command_measures_activation_overlap(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "a.txt"
    a.write_text("\n".join(f"What is {i} plus {i + 3}?" for i in range(6)))
    b = tmp_path / "b.jsonl"
    rows = [{"prompt": f"How do I open the lock of the Zorblax box {i}?"} for i in range(5)]
    b.write_text("\n".join(json.dumps(row) for row in rows))
    c = {k: str(v) for k, v in checkpoints.items()}
    args = [c["base"], c["aligned"], c["lora"], "--activations", str(a), str(b), "--activation-layers", "1,2"]
    code, _, err = run_cli(args + ["--activation-eta", "0.5", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "activations.json").read_text())
    assert record["prompt_counts"] == {"a": 6, "b": 5}
    assert {(r["model"], r["layer"]) for r in record["rows"]} == {
        (m, layer) for m in ("base", "aligned", "lora") for layer in (1, 2)
    }
    for row in record["rows"]:
        assert row["d"] == 64 and 0 <= row["mso"] <= 1 + 1e-9
        assert row["mso_random"] == pytest.approx(max(row["k_a"], row["k_b"]) / 64)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "3"], "k = 3 exceeds the rank 2 of the alignment update of model.layers.0"),
        (["--project", "onto"], "--project needs --k or --frac"),
        (["--frac", "0.5"], "belong to --project"),
        (["--tensors", "nothing-matches"], "no tensor matches"),
        (["--k", "2", "--eta", "0.5"], "give one"),
        (["--layers", "7"], "--layers 7"),
    ],
)
def test_bad_options_are_one_error_line(
    checkpoints: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    c = {k: str(v) for k, v in checkpoints.items()}
    code, _, err = run_cli([c["base"], c["aligned"], c["useful"], "--out", str(tmp_path), *extra], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_bad_checkpoints_are_one_error_line(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = {k: str(v) for k, v in checkpoints.items()}
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli([c["base"], str(empty), c["useful"], "--out", str(tmp_path)], capsys)
    assert code == 2 and "ALIGNED" in err and "not a checkpoint" in err and err.count("\n") == 1
    code, _, err = run_cli([c["base"], str(tmp_path / "missing"), c["useful"]], capsys)
    assert code == 2 and "no such file or directory" in err
    config = json.loads((checkpoints["base"] / "config.json").read_text())
    wide = tmp_path / "wide"
    tensors = load_file(str(checkpoints["base"] / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(65)
    write_full(wide, checkpoints["base"], tensors)
    (wide / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli([c["base"], c["aligned"], str(wide), "--out", str(tmp_path)], capsys)
    assert code == 2 and "different architectures" in err and "model.norm.weight" in err
    assert err.count("\n") == 1


def test_labels_default_to_folder_names_made_unique() -> None:
    assert labels_for(["runs/a/policy", "x/a", "alignment"], None) == ["a", "a-2", "alignment-2"]
    with pytest.raises(SubspaceError, match="--labels"):
        labels_for(["a", "b"], ["same", "same"])
