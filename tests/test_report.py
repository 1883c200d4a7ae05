"""`incentive report`: plots, a self-contained page, the sample browser, comparisons and odd run folders."""

import base64
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from incentive.cli import main
from incentive.report.loading import load_run, load_runs
from incentive.report.plots import accuracy_figure, reward_figure, signal_figure, update_figure

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ("reward", "accuracy", "length", "kl_clip", "update", "signal", "throughput", "failures", "sft")
PLANTED = "<script>alert('pwned')</script></pre></td>"
TRAIN = [
    "train",
    "recipes/nover-chain-sum.yaml",
    "--set",
    "model.name=tiny-random",
    "--set",
    "data.size=8",
    "--set",
    "rl.steps=3",
    "--set",
    "generation.max_new_tokens=8",
    "--set",
    "generation.prompts_per_step=2",
    "--set",
    "generation.num_generations=2",
    "--set",
    "sft.steps=1",
    "--set",
    "sft.batch_size=2",
    "--set",
    "eval.data.size=2",
    "--set",
    "eval.max_new_tokens=4",
    "--set",
    "rl.skip_zero_advantage=false",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run of the NOVER chain_sum recipe on the tiny model: base eval, 1 SFT step, 3 RL steps, final evals."""
    path = tmp_path_factory.mktemp("runs") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        assert main([*TRAIN, "--run-dir", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def report(run_dir) -> str:
    """The default report of that run (RUN_DIR/report/report.html)."""
    assert main(["report", str(run_dir)]) == 0
    return (run_dir / "report" / "report.html").read_text()


@pytest.fixture(scope="module")
def planted(run_dir, tmp_path_factory) -> Path:
    """A copy of the run whose logged completions, reasoning and reasons hold markup, plus NOVER details and a
    half-written last line (a killed process)."""
    path = tmp_path_factory.mktemp("runs") / "planted"
    shutil.copytree(run_dir, path, ignore=shutil.ignore_patterns("checkpoints", "report"))
    lines = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for i, sample in enumerate(record.get("samples", [])):
            sample["completion"] = PLANTED
            sample["reasoning"] = f"think {PLANTED}"
            sample["reasons"] = [f"nover_reasoning: {PLANTED}"]
            sample["details"] = {"nover_reasoning": {"perplexity": 12.5 + i, "rank": i + 1, "group_size": 2}}
        lines.append(json.dumps(record))
    (path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"stage": "rl", "step": 4, "reward/me')
    return path


def rl_records(run: Path) -> list[dict]:
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["stage"] == "rl"
    ]


def step_pages(html: str) -> dict[int, str]:
    """Each step page of the (first) sample browser, by step."""
    chunks = html.split('<div class="step" data-step="')[1:]
    chunks[-1] = chunks[-1].split("<script>")[0]
    return {int(chunk.split('"', 1)[0]): chunk for chunk in chunks}


def test_writes_one_valid_png_per_plot_and_embeds_each(run_dir, report):
    out = run_dir / "report"
    for name in PLOTS:
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = struct.unpack(">II", data[16:24])  # IHDR
        assert width > 300 and height > 200, name
        assert base64.b64encode(data).decode() in report, f"{name}.png is not embedded"
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(PLOTS)
    assert report.count('<img src="data:image/png;base64,') == len(PLOTS)


def test_page_is_self_contained(report):
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", report, re.IGNORECASE)
    assert "<link" not in report and "@import" not in report and "url(" not in report
    assert "<script>" in report and "<script src" not in report


def test_sample_browser_matches_metrics(run_dir, report):
    records = rl_records(run_dir)
    pages = step_pages(report)
    assert sorted(pages) == [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        page = pages[record["step"]]
        assert page.count('<tr class="sample">') == len(record["samples"]) == 2
        assert page.startswith(f'{record["step"]}" hidden>') != (record["step"] == 3)  # the last step shows
        for name in record["samples"][0]["components"]:
            assert f"<th>{name}</th>" in page
    assert report.count("<option ") == 3 and '<option value="3" selected>' in report


def test_browser_shows_the_verifiers_verdict_on_each_completion(run_dir, report):
    records = rl_records(run_dir)
    pages = step_pages(report)
    for record in records:
        page = pages[record["step"]]
        assert "<th>correct (verifier)</th>" in page
        for sample in record["samples"]:
            assert sample["reference"] and isinstance(sample["correct"], bool)
            assert isinstance(sample["correct_lenient"], bool)
            assert sample["correct"] <= sample["correct_lenient"]
        cells = re.findall(r'<td class="verdict" data-correct="(\w*)">', page)
        assert cells == [str(s["correct"]).lower() for s in record["samples"]]
        judged = f"correct {sum(s['correct'] for s in record['samples'])}/{len(record['samples'])}</option>"
        assert judged in report


def test_verdicts_read_right_wrong_and_any_format(planted, tmp_path):
    judged = tmp_path / "judged"
    shutil.copytree(planted, judged)
    lines = (judged / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-2])
    verdicts = [(True, True, "42"), (False, True, "<b>7</b>")]
    for sample, (correct, lenient, answer) in zip(record["samples"], verdicts, strict=True):
        sample.update(correct=correct, correct_lenient=lenient, answer=answer)
    record["samples"].append({"completion": "no reference", "correct": None, "correct_lenient": None})
    (judged / "metrics.jsonl").write_text("\n".join([*lines[:-2], json.dumps(record)]) + "\n")
    assert main(["report", str(judged), "--out", str(tmp_path / "out")]) == 0
    page = step_pages((tmp_path / "out" / "report.html").read_text())[record["step"]]
    cells = re.findall(r'<td class="verdict" data-correct="(\w*)">(.*?)</td>', page)
    assert [c for c, _ in cells] == ["true", "false", ""]
    assert "✓ correct" in cells[0][1] and "read: 42" in cells[0][1]
    assert "✗ strict" in cells[1][1] and "✓ any format" in cells[1][1]
    assert "read: &lt;b&gt;7&lt;/b&gt;" in cells[1][1]
    assert cells[2][1] == "–"


def test_summaries_show_the_run_and_its_evals(run_dir, report):
    evals = json.loads((run_dir / "evals.json").read_text())
    assert set(evals) == {"base", "sft", "rl"}
    assert report.count("<td>tiny</td>") == len(evals)  # one row per stage
    assert '<span class="swatch" style="background:#1f77b4"></span>tiny</td>' in report  # the runs table
    assert "tiny-random" in report and "nover_reasoning" in report


def test_completions_and_reasons_are_escaped(planted, tmp_path):
    assert main(["report", str(planted), "--out", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert PLANTED not in html and "alert('pwned')" not in html
    assert html.count("<script") == 1  # only the page's own
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;&lt;/pre&gt;&lt;/td&gt;" in html
    pages = step_pages(html)
    page = pages[max(pages)]
    assert "<th>reasoning</th>" in page and "<th>details</th>" in page
    assert "perplexity 12.5" in page and "rank 1" in page and "group_size 2" in page
    assert page.count('<tr class="sample">') == 2


def test_half_written_lines_are_skipped(planted):
    run = load_run(planted)
    assert [r["step"] for r in run.rl] == [1, 2, 3] and [r["step"] for r in run.sft] == [1]


def test_several_runs_overlaid_default_to_report_here(run_dir, planted, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run_dir), str(planted)]) == 0
    html_path = tmp_path / "report" / "report.html"
    assert str(Path("report") / "report.html") in capsys.readouterr().out
    html = html_path.read_text()
    assert "<td>tiny</td>" in html and "<td>planted</td>" in html
    assert html.count('class="browser"') == 2
    assert all((tmp_path / "report" / f"{name}.png").is_file() for name in PLOTS)
    total = reward_figure(load_runs([run_dir, planted])).axes[0]
    assert [line.get_label() for line in total.get_lines()] == ["tiny", "planted"]
    assert [line.get_color() for line in total.get_lines()] == ["C0", "C1"]


def test_same_folder_names_are_told_apart(run_dir, tmp_path):
    other = tmp_path / "b" / "tiny"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("checkpoints", "report"))
    assert [r.label for r in load_runs([run_dir, other])] == [str(run_dir), str(other)]


def test_missing_run_folder_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["report", str(missing)]) == 2
    assert f"{missing} is not a run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "empty is not a run folder: it has no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sft_only_run(run_dir, tmp_path):
    sft = tmp_path / "sft-only"
    sft.mkdir()
    lines = [x for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"stage": "sft"' in x]
    (sft / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(sft)]) == 0
    out = sft / "report"
    assert sorted(p.stem for p in out.glob("*.png")) == ["sft", "throughput"]
    html = (out / "report.html").read_text()
    assert "No completions logged in this run" in html and "No held-out evaluation" in html


def test_old_single_step_run_without_newer_keys(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    record = {
        "stage": "rl",
        "step": 1,
        "reward/mean": 0.25,
        "length/mean": 12.0,
        "samples": [{"prompt": "1 + 1 =", "completion": "2", "reward": 0.25}, {"completion": None}],
    }
    (old / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["report", str(old)]) == 0
    html = (old / "report" / "report.html").read_text()
    assert step_pages(html)[1].count('<tr class="sample">') == 2
    assert "<th>reasoning</th>" not in html and "<th>details</th>" not in html
    assert {p.stem for p in (old / "report").glob("*.png")} == {
        "reward",
        "length",
        "kl_clip",
        "update",
        "signal",
        "failures",
    }
    assert "<th>correct (verifier)</th>" not in html


def panel_lines(fig) -> dict[str, list[list[float]]]:
    """Each panel's title → the y values of its data lines."""
    return {ax.get_title(): [list(line.get_ydata()) for line in ax.get_lines()] for ax in fig.axes}


def test_learning_plots_draw_the_logged_rl_metrics(run_dir):
    run = load_run(run_dir)
    records = rl_records(run_dir)
    keys = ("train/loss", "train/grad_norm", "lr", "advantage/std", "advantage/zero_share")
    keys += ("advantage/no_signal_group_share", "policy/entropy_estimate")
    assert all(isinstance(r[key], float) for r in records for key in keys)
    assert all(0.0 < r["policy/entropy_estimate"] < 20.0 for r in records)
    update = panel_lines(update_figure([run]))
    assert update["loss"] == [[r["train/loss"] for r in records]]
    assert update["gradient norm (before clipping)"] == [[r["train/grad_norm"] for r in records]]
    assert update["learning rate"] == [[r["lr"] for r in records]]
    signal = panel_lines(signal_figure([run]))
    assert signal["advantage std"] == [[r["advantage/std"] for r in records]]
    assert signal["without signal"] == [
        [r["advantage/zero_share"] for r in records],
        [r["advantage/no_signal_group_share"] for r in records],
    ]
    entropy = next(v for k, v in signal.items() if k.startswith("policy entropy"))
    assert entropy == [[r["policy/entropy_estimate"] for r in records]]


def test_accuracy_plot_draws_strict_and_any_format_with_intervals(run_dir, tmp_path):
    evals = json.loads((run_dir / "evals.json").read_text())
    assert all(len(evals[s][f"{k}_ci"]) == 2 for s in evals for k in ("accuracy", "accuracy_lenient"))
    copy = tmp_path / "ci"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    made_up = {"sft": (0.25, 0.1, 0.5, 0.5), "rl": (0.5, 0.3, 0.7, 0.75)}  # strict, its interval, any format
    for stage, (rate, low, high, lenient) in made_up.items():
        evals[stage].update(accuracy=rate, accuracy_ci=[low, high], accuracy_lenient=lenient)
        evals[stage]["accuracy_lenient_ci"] = [lenient - 0.2, min(1.0, lenient + 0.2)]
    (copy / "evals.json").write_text(json.dumps(evals))
    bars, curve = accuracy_figure([load_run(copy)]).axes
    assert [line.get_label() for line in curve.get_lines()] == ["ci: strict", "ci: any format"]
    strict, lenient = (list(line.get_ydata()) for line in curve.get_lines())
    assert strict == [0.25, 0.5] and lenient == [0.5, 0.75]  # before RL (after SFT) at 0, after RL at 3
    (band, lenient_band) = curve.collections
    low_high = band.get_paths()[0].vertices[:, 1]
    assert min(low_high) == pytest.approx(0.1) and max(low_high) == pytest.approx(0.7)
    assert max(lenient_band.get_paths()[0].vertices[:, 1]) == pytest.approx(0.95)
    heights = sorted(round(p.get_height(), 3) for p in bars.patches)
    base = [evals["base"]["accuracy"], evals["base"]["accuracy_lenient"]]
    assert heights == sorted([*base, 0.25, 0.5, 0.5, 0.75])
