"""The report page: one self-contained HTML file (plots as data URIs, inline CSS and JS, nothing fetched), with
run summaries, the plots and a per-step browser of the logged completions. Every logged text is escaped."""

from __future__ import annotations

import base64
import datetime
from html import escape
from typing import Any

from matplotlib.colors import to_hex

from incentive.report.loading import RunData, number
from incentive.report.plots import Plot, colour

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1rem 2rem 3rem; color: #1d1d1f; background: #fafafa; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .3rem; }
.muted { color: #666; } .swatch { display: inline-block; width: .8em; height: .8em; border-radius: 2px;
         margin-right: .4em; vertical-align: baseline; }
table { border-collapse: collapse; margin: .5rem 0 1rem; background: #fff; }
th, td { border: 1px solid #ddd; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f3; position: sticky; top: 0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; background: #fff; border: 1px solid #e3e3e3; }
figcaption { font-weight: 600; margin-bottom: .3rem; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font: 12.5px/1.4 ui-monospace, Menlo, monospace;
      max-height: 24rem; overflow: auto; }
.controls { display: flex; gap: .6rem; align-items: center; margin: .6rem 0; }
.given { background: #fff; border: 1px solid #ddd; padding: .5rem .8rem; margin-bottom: .5rem; }
.scroll { overflow-x: auto; } table.samples { width: 100%; } pre.completion { min-width: 18rem; }
table.samples pre.prompt, table.samples pre.reasoning { min-width: 10rem; }
.reasons { color: #a33; } ul.details { margin: 0; padding-left: 1rem; }
.verdict { min-width: 8rem; max-width: 16rem; word-break: break-word; }
.right { color: #1a7f37; white-space: nowrap; } .wrong { color: #b42318; white-space: nowrap; }
"""

SCRIPT = """
for (const browser of document.querySelectorAll(".browser")) {
  const select = browser.querySelector("select");
  const show = () => {
    for (const step of browser.querySelectorAll(".step")) step.hidden = step.dataset.step !== select.value;
  };
  select.addEventListener("change", show);
  for (const button of browser.querySelectorAll("button[data-move]")) {
    button.addEventListener("click", () => {
      const index = select.selectedIndex + Number(button.dataset.move);
      if (index >= 0 && index < select.options.length) { select.selectedIndex = index; show(); }
    });
  }
  show();
}
"""

EVAL_COLUMNS = (
    ("accuracy", "accuracy", True),
    ("pass@1", "pass@1", True),
    ("format_rate", "format", True),
    ("length_mean", "mean length", False),
    ("truncated_share", "truncated", True),
    ("n", "completions", False),
)


def fmt(value: Any, percent: bool = False) -> str:
    """A table cell's text: numbers rounded, missing values as a dash, everything else escaped."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return escape(str(value))
    if number(value) is None:
        return escape(str(value))
    if percent:
        return f"{value:.1%}"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _name(config: dict[str, Any], section: str) -> Any:
    """``config[section]["name"]`` of a resolved recipe, None when absent."""
    value = config.get(section)
    return value.get("name") if isinstance(value, dict) else None


def _reward_label(reward: dict[str, Any]) -> str:
    """A recipe's reward entry as the report names it: its id (its metrics' key) with the reward it runs."""
    name, key = str(reward.get("name")), reward.get("id")
    return f"{key} ({name})" if key and key != name else name


def _runs_section(runs: list[RunData]) -> str:
    """One row per run: its colour, folder, model, steps, rewards and where RL ended."""
    rows = []
    for i, run in enumerate(runs):
        cfg = run.config
        rewards = ", ".join(_reward_label(r) for r in cfg.get("rewards") or [] if isinstance(r, dict))
        last = run.rl[-1] if run.rl else {}
        cells = [
            f'<span class="swatch" style="background:{_css_colour(i)}"></span>{escape(run.label)}',
            escape(str(run.path)),
            fmt(_name(cfg, "model")),
            fmt(len(run.sft)),
            fmt(len(run.rl)),
            escape(rewards) or "–",
            fmt(_name(cfg, "advantage")),
            fmt(last.get("reward/mean")),
            fmt(last.get("time/rl_elapsed_s")),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = (
        "run",
        "folder",
        "model",
        "SFT steps",
        "RL steps",
        "rewards",
        "advantage",
        "last reward",
        "RL seconds",
    )
    return _table(head, rows)


def _evals_section(runs: list[RunData]) -> str:
    """Held-out results at each stage end, one row per run and stage."""
    rows = []
    for run in runs:
        for stage, result in run.evals.items():
            if stage.startswith("rl-step"):  # evals during RL: in the accuracy plot
                continue
            cells = [escape(run.label), escape(stage)]
            cells += [fmt(result.get(key), percent) for key, _, percent in EVAL_COLUMNS]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        return '<p class="muted">No held-out evaluation in these runs.</p>'
    return _table(("run", "stage", *(label for _, label, _ in EVAL_COLUMNS)), rows)


def _table(head: tuple[str, ...], rows: list[str], cls: str = "") -> str:
    """A table from escaped headings and already-rendered rows."""
    return (
        f'<table class="{cls}"><thead><tr>'
        + "".join(f"<th>{escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _css_colour(index: int) -> str:
    """The hex value of matplotlib's ``C<index>`` so the page's swatches match the plot lines."""
    return to_hex(colour(index))


def _plots_section(plots: list[Plot]) -> str:
    """Each PNG inlined as a data URI, so the page needs no files beside it."""
    if not plots:
        return '<p class="muted">Nothing to plot in these runs.</p>'
    figures = []
    for plot in plots:
        data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
        figures.append(
            f'<figure id="plot-{plot.name}"><figcaption>{escape(plot.title)}</figcaption>'
            f'<img src="data:image/png;base64,{data}" alt="{escape(plot.title)}"></figure>'
        )
    return "".join(figures)


def _details(details: Any) -> str:
    """Per-component values of one sample (e.g. NOVER's perplexity and rank), missing ones left out."""
    if not isinstance(details, dict):
        return ""
    items = []
    for part, values in details.items():
        if not isinstance(values, dict):
            continue
        shown = [f"{escape(str(k))} {fmt(v)}" for k, v in values.items() if v is not None]
        if shown:
            items.append(f"<li><b>{escape(str(part))}</b>: {' · '.join(shown)}</li>")
    return f'<ul class="details">{"".join(items)}</ul>' if items else ""


def _verdict(sample: dict[str, Any]) -> str:
    """The verifier's after-the-fact verdict on one logged completion (strict, and regardless of format) and the
    answer it read; a dash when it could not judge (no reference)."""
    correct, lenient = sample.get("correct"), sample.get("correct_lenient")
    if not isinstance(correct, bool):
        return '<td class="verdict" data-correct="">–</td>'
    if correct:
        text = '<span class="right">✓ correct</span>'
    elif lenient is True:
        text = '<span class="wrong">✗ strict</span> · <span class="right">✓ any format</span>'
    else:
        text = '<span class="wrong">✗ wrong</span>'
    answer = sample.get("answer")
    read = f'<br><span class="muted">read: {escape(str(answer))}</span>' if answer is not None else ""
    return f'<td class="verdict" data-correct="{str(correct).lower()}">{text}{read}</td>'


def _judged(samples: list[dict[str, Any]]) -> str:
    """``· correct k/n`` over the step's completions the verifier judged, empty when it judged none."""
    verdicts = [s["correct"] for s in samples if isinstance(s.get("correct"), bool)]
    return f" · correct {sum(verdicts)}/{len(verdicts)}" if verdicts else ""


def _samples_table(samples: list[dict[str, Any]]) -> str:
    """One row per logged completion; the prompt and reference go above when every row shares them."""
    shared = {key: {str(s.get(key)) for s in samples} for key in ("prompt", "reference")}
    given = ""
    if len(shared["prompt"]) == 1 and len(shared["reference"]) == 1:
        prompt, reference = samples[0].get("prompt"), samples[0].get("reference")
        given = (
            f'<div class="given"><b>prompt</b><pre class="prompt">{escape(str(prompt or ""))}</pre>'
            f'<b>reference</b><pre class="reference">{escape(str(reference or ""))}</pre></div>'
        )
    components = sorted(
        {k for s in samples if isinstance(s.get("components"), dict) for k in s["components"]}
    )
    reasoning = any(s.get("reasoning") for s in samples)
    judged = any("correct" in s for s in samples)
    details = [_details(s.get("details")) for s in samples]
    head = (
        ["#"]
        + ([] if given else ["prompt", "reference"])
        + ["completion"]
        + (["reasoning"] if reasoning else [])
    )
    head += (["correct (verifier)"] if judged else []) + ["reward", *components, "reasons"]
    head += ["details"] if any(details) else []
    rows = []
    for index, (sample, detail) in enumerate(zip(samples, details, strict=True)):
        cells = [f'<td class="num">{index + 1}</td>']
        if not given:
            cells += [
                f'<td><pre class="{k}">{escape(str(sample.get(k) or ""))}</pre></td>'
                for k in ("prompt", "reference")
            ]
        cells.append(f'<td><pre class="completion">{escape(str(sample.get("completion") or ""))}</pre></td>')
        if reasoning:
            cells.append(
                f'<td><pre class="reasoning">{escape(str(sample.get("reasoning") or ""))}</pre></td>'
            )
        if judged:
            cells.append(_verdict(sample))
        parts = sample.get("components") if isinstance(sample.get("components"), dict) else {}
        cells.append(f'<td class="num"><b>{fmt(sample.get("reward"))}</b></td>')
        cells += [f'<td class="num">{fmt(parts.get(name))}</td>' for name in components]
        reasons = sample.get("reasons") if isinstance(sample.get("reasons"), list) else []
        cells.append(f'<td class="reasons">{"<br>".join(escape(str(r)) for r in reasons)}</td>')
        if any(details):
            cells.append(f"<td>{detail}</td>")
        rows.append(f'<tr class="sample">{"".join(cells)}</tr>')
    return f'{given}<div class="scroll">{_table(tuple(head), rows, "samples")}</div>'


def _browser(index: int, run: RunData) -> str:
    """A step selector over one run's logged completions; the last step shows first (and without JS)."""
    logged = {r["step"]: [s for s in r.get("samples") or [] if isinstance(s, dict)] for r in run.rl}
    steps = [r for r in run.rl if logged[r["step"]]]
    title = (
        f'<h3><span class="swatch" style="background:{_css_colour(index)}"></span>{escape(run.label)}</h3>'
    )
    if not steps:
        why = "" if run.rl else " (no RL steps)"
        return f'{title}<p class="muted">No completions logged in this run{why}.</p>'
    last = steps[-1]["step"]
    options = "".join(
        f'<option value="{r["step"]}"{" selected" if r["step"] == last else ""}>step {r["step"]} '
        f"· reward {fmt(r.get('reward/mean'))}{_judged(logged[r['step']])}</option>"
        for r in steps
    )
    controls = (
        f'<div class="controls"><label>step <select aria-label="step of {escape(run.label)}">{options}</select>'
        '</label><button type="button" data-move="-1">◀ previous</button>'
        f'<button type="button" data-move="1">next ▶</button><span class="muted">{len(steps)} steps'
        f" with completions</span></div>"
    )
    pages = "".join(
        f'<div class="step" data-step="{r["step"]}"{"" if r["step"] == last else " hidden"}>'
        f"{_samples_table(logged[r['step']])}</div>"
        for r in steps
    )
    return f'<div class="browser" id="samples-{index}">{title}{controls}{pages}</div>'


def render(runs: list[RunData], plots: list[Plot]) -> str:
    """The whole page."""
    labels = ", ".join(run.label for run in runs)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>incentive report: {escape(labels)}</title><style>{CSS}</style></head>
<body>
<h1>incentive report</h1>
<p class="muted">{len(runs)} run{"s" if len(runs) != 1 else ""} · made {when} by <code>incentive report</code></p>
<h2>Runs</h2>{_runs_section(runs)}
<h2>Held-out evaluation</h2>{_evals_section(runs)}
<h2>Plots</h2>{_plots_section(plots)}
<h2>Completions by step</h2>
<p class="muted">The completions each RL step logged (one prompt's group): whether each is correct, judged after
the fact by the rule verifier against the reference as the held-out eval judges (strictly, else regardless of
format, with the answer it read) whatever the rewards were; their total reward, each reward component, why a
component could not score them, and per-component details such as NOVER's perplexity and rank.</p>
{"".join(_browser(i, run) for i, run in enumerate(runs))}
<script>{SCRIPT}</script>
</body></html>
"""
