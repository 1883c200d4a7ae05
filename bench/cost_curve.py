"""How an RL step's time and memory grow with completion length and model width, incentive against TRL.

    .venv/bin/python bench/cost_curve.py                         # lengths 64 256 512 1024, embedded + wide
    .venv/bin/python bench/cost_curve.py --lengths 64 256 --models embedded
    .venv/bin/python bench/cost_curve.py --wide-lengths 64 256 512     # the wide model at fewer lengths

At each point both tools run the same full fine-tuning GRPO step (4 prompts x 4 completions, every completion
exactly L new tokens: no end token is sampled before L; rewarded by the share of digits, or for the wide model,
which writes none, by a hash of the text, so that every group trains), each in its own process, ``--steps``
steps of which the first is warm-up, as in ``bench/grpo_vs_trl.py`` (whose children this reuses). Models: ``embedded``
(SmolLM2-135M) and ``wide``, a random-initialised model of the same family at twice its width (hidden 1152,
18 heads of 64, 6 key/value heads, MLP 3072; ~4x the body's parameters), written once into the incentive cache.
TRL trains in micro-batches small enough for this machine's memory (fewer completions per pass as L grows).
incentive runs a third time at each point with ``model.activation_checkpointing`` (its peak memory and step time
beside the default's). With ``--bf16 MODEL ...`` both tools also update in bf16 mixed precision at that model's
points (TRL ``bf16=True``; incentive ``model.update_products: bfloat16``), and the time ratio there is TRL's
faster precision over incentive's, the memory ratio incentive's default over TRL's leaner precision.
Writes bench/results/cost_curve-MACHINE.{json,md} and docs/images/cost_curve-MACHINE.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from grpo_vs_trl import (
    ROOT,
    Workload,
    machine_kind,
    measured_matmul_rates,
    ratios,
    run_child,
    summarize,
)
from progress import Progress

from incentive.paths import cache_dir

WIDE = {
    "hidden_size": 1152,
    "intermediate_size": 3072,
    "num_attention_heads": 18,
    "num_key_value_heads": 6,
    "head_dim": 64,
}


def wide_model() -> Path:
    """The embedded model's configuration at twice its width, random-initialised (seed 0), with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from incentive.models.loading import embedded_dir
    from incentive.paths import cache_dir

    target = cache_dir() / "models" / "bench-wide-random"
    if (target / "model.safetensors").exists():
        return target
    config = AutoConfig.from_pretrained(embedded_dir())
    for key, value in WIDE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(embedded_dir()).save_pretrained(tmp)
    tmp.rename(target)
    return target


def workload(model: str, length: int) -> Workload:
    """The curve's step at one point; TRL's micro-batch keeps its activations to ~4k tokens (2k when wide)."""
    budget = 2048 if model != "embedded" else 4096
    return Workload(
        prompts=4,
        generations=4,
        max_new_tokens=length,
        min_new_tokens=length,
        reward="digits" if model == "embedded" else "hash",
        model=model,
        trl_micro_batch=max(1, min(16, budget // length)),
    )


TOOL_LABELS = {
    "trl": "TRL",
    "trl_bf16": "TRL bf16",
    "incentive_bf16": "incentive bf16",
    "incentive": "incentive",
    "incentive_checkpointing": "incentive + act. ckpt",
}


def step_time(summary: dict) -> float:
    return summary["median_step_s"]


def plot(results: dict, path: Path) -> None:
    """Step time and peak RSS against completion length, one line per (tool, model), ratios annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model, points in results["models"].items():
        for tool, style in (
            ("trl", "--"),
            ("trl_bf16", "-."),
            ("incentive", "-"),
            ("incentive_bf16", (0, (5, 1, 1, 1, 1, 1))),
            ("incentive_checkpointing", ":"),
        ):
            ran = [p for p in points if tool in p]
            if not ran:
                continue
            label = f"{TOOL_LABELS[tool]}, {model}"
            at = [p["length"] for p in ran]
            time_ax.plot(at, [step_time(p[tool]) for p in ran], linestyle=style, marker="o", label=label)
            memory_ax.plot(at, [p[tool]["peak_rss_gb"] for p in ran], linestyle=style, marker="o", label=label)
        for p in points:
            q = p["ratios"]
            time_ax.annotate(
                f"{q['step_time_trl_over_incentive']:.1f}x",
                (p["length"], min(step_time(p[t]) for t in ("incentive", "incentive_bf16") if t in p)),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
            )
            memory_ax.annotate(
                f"{q['peak_rss_incentive_over_trl']:.2f}",
                (p["length"], p["incentive"]["peak_rss_gb"]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
            )
    for ax, title in (
        (time_ax, "step time (s); TRL's fastest / incentive"),
        (memory_ax, "peak RSS (GB); incentive / TRL's leanest"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("completion length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Full fine-tuning GRPO step, 4 prompts x 4 completions, {results['machine']['model_name']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    """One row per point. Where both tools also ran in bf16, steps read "fp32 / bf16", the ratio is the faster
    precision's over the faster one's, and the same-precision bf16 ratio follows; memory is the default
    (fp32) incentive's over TRL's leaner precision."""
    lines = [
        "| model | length | TRL step (s) | incentive step (s) | ratio | bf16 ratio | TRL gen / train (s) "
        "| incentive gen / train (s) | TRL RSS (GB) | incentive RSS (GB) | memory ratio "
        "| incentive + act. ckpt: step (s) / RSS (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def steps(p: dict, tool: str) -> str:
        bf16 = f" / {step_time(p[tool + '_bf16']):.1f}" if tool + "_bf16" in p else ""
        return f"{step_time(p[tool]):.1f}{bf16}"

    for model, points in results["models"].items():
        for p in points:
            t, i, c, q = p["trl"], p["incentive"], p["incentive_checkpointing"], p["ratios"]
            same = q.get("bf16_step_time_trl_over_incentive")
            lines.append(
                f"| {model} | {p['length']} | {steps(p, 'trl')} | {steps(p, 'incentive')} "
                f"| {q['step_time_trl_over_incentive']:.2f}x | {f'{same:.2f}x' if same else '-'} "
                f"| {t['median_generate_s']:.1f} / {t['median_train_s']:.1f} "
                f"| {i['median_generate_s']:.1f} / {i['median_train_s']:.1f} "
                f"| {t['peak_rss_gb']:.2f} | {i['peak_rss_gb']:.2f} | {q['peak_rss_incentive_over_trl']:.2f} "
                f"| {step_time(c):.1f} / {c['peak_rss_gb']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512, 1024])
    parser.add_argument(
        "--wide-lengths", type=int, nargs="+", help="lengths for the wide model (default: --lengths)"
    )
    parser.add_argument("--models", nargs="+", default=["embedded", "wide"], choices=["embedded", "wide"])
    parser.add_argument(
        "--bf16",
        nargs="+",
        default=[],
        choices=["embedded", "wide"],
        help="models at whose points both tools also update in bf16 mixed precision",
    )
    parser.add_argument("--steps", type=int, default=2, help="steps per run; the first is warm-up")
    parser.add_argument(
        "--resume", action="store_true", help="reuse the runs an interrupted invocation finished (in the cache)"
    )
    args = parser.parse_args()
    names = {m: (m if m == "embedded" else str(wide_model())) for m in args.models}
    rates = [measured_matmul_rates("before the runs")]
    kind = machine_kind()
    results: dict = {
        "machine": {**kind, "matmul_gflops": rates},
        "workload": {"prompts": 4, "generations": 4, "steps": args.steps, "variant": "full"},
        "models": {},
    }
    lengths = {m: (args.wide_lengths or args.lengths) if m == "wide" else args.lengths for m in args.models}
    runs_per_point = {m: 5 if m in args.bf16 else 3 for m in args.models}
    progress = Progress("curve", sum(len(v) * runs_per_point[m] for m, v in lengths.items()))
    raw: dict[tuple[str, int], dict[str, dict]] = {}
    kept = cache_dir() / "bench" / f"cost_curve-{kind['kind']}"
    if not args.resume:
        shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for length in lengths[model]:
            work = workload(names[model], length)
            tools = [
                ("trl", work),
                ("incentive", work),
                ("incentive-checkpointing", replace(work, checkpointing=True)),
            ]
            if model in args.bf16:
                tools += [
                    ("trl-bf16", replace(work, trl_bf16=True)),
                    ("incentive-bf16", replace(work, update_products="bfloat16")),
                ]
            for tool, spec in tools:
                progress.start(f"{model}, {length} tokens: {tool.replace('trl', 'TRL')}")
                out = kept / f"{tool}-{model}-{length}.json"
                child = tool.split("-")[0]
                raw.setdefault((model, length), {})[tool] = run_child(
                    child, "full", args.steps, out, "float32", spec, args.resume
                )
    rates.append(measured_matmul_rates("after the runs"))
    rate = max(r for sample in rates for name, r in sample.items() if isinstance(r, float))
    results["machine"]["utilisation_denominator_gflops"] = rate
    for (model, length), runs in raw.items():
        point = {tool.replace("-", "_"): summarize([run], "full", rate) for tool, run in runs.items()}
        trls = [point[t] for t in ("trl", "trl_bf16") if t in point]
        incs = [point[t] for t in ("incentive", "incentive_bf16") if t in point]
        q = ratios(min(trls, key=step_time), min(incs, key=step_time))
        q["peak_rss_incentive_over_trl"] = point["incentive"]["peak_rss_gb"] / min(r["peak_rss_gb"] for r in trls)
        if "incentive_bf16" in point:
            q["bf16_step_time_trl_over_incentive"] = step_time(point["trl_bf16"]) / step_time(point["incentive_bf16"])
        results["models"].setdefault(model, []).append(
            {"length": length, "workload": asdict(workload(names[model], length)), **point, "ratios": q, "raw": runs}
        )
    target = ROOT / "bench" / "results"
    target.mkdir(parents=True, exist_ok=True)
    stem = f"cost_curve-{kind['kind']}"
    (target / f"{stem}.json").write_text(json.dumps(results, indent=2))
    markdown = f"Machine: {kind['model_name']} ({kind['kind']}).\n\n" + table(results)
    (target / f"{stem}.md").write_text(markdown)
    plot(results, ROOT / "docs" / "images" / f"{stem}.png")
    print(markdown)


if __name__ == "__main__":
    main()
