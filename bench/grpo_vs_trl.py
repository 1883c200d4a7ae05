"""Side-by-side GRPO benchmark: incentive vs TRL's GRPOTrainer on the same workload, same machine, same run.

    .venv/bin/python bench/grpo_vs_trl.py                 # full fine-tune and LoRA r=16, alternating tools
    .venv/bin/python bench/grpo_vs_trl.py --variants full --steps 4 --reps 2
    .venv/bin/python bench/grpo_vs_trl.py --sampling-dtype bfloat16   # CPUs with AMX: incentive samples in bf16

Workload: the embedded SmolLM2-135M, 4 prompts x 4 completions per step, <= 64 new tokens, fp32 on the CPU, a
reward whose values vary within every group (closeness of the completion's length to 120 characters), so both
tools do real work each step. Each (tool, variant, repetition) runs in its own process so peak RSS is its own.
TRL gets the model as transformers loads it (default kernels); incentive its own loading (oneDNN linears).
The first step of every run is warm-up and is left out of the medians. A generation-only comparison at batch
16 (the same prompts, 4 samples each) pits incentive's engine against plain HF ``generate``. Writes
bench/results/grpo_vs_trl.json and .md with ratios (TRL / incentive for time and memory, incentive / TRL for
throughput) and utilisation: model FLOPs per second over the best fp32 matmul rate measured here (before the
first run and after each variant's runs: the rate of a shared VM drifts by the hour, and the best one measured
is the strictest yardstick).
With ``--sampling-dtype bfloat16`` incentive samples from a bf16 copy of the policy (``generation.sampling_dtype``)
and HF ``generate`` runs a bf16 model; TRL's trainer samples with its fp32 training model as always. Those results
go to grpo_vs_trl_bfloat16.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from progress import Progress

ROOT = Path(__file__).resolve().parents[1]
PARAMS = 134.5e6
PROMPTS, GENERATIONS, NEW_TOKENS = 4, 4, 64


def length_reward(texts: list[str]) -> list[float]:
    """Varies within every group: 1 at 120 characters, falling off linearly."""
    return [max(0.0, 1.0 - abs(len(t) - 120) / 120) for t in texts]


# The workload's data, as recipe fields (``size`` added per run).
DATA = {
    "source": "task:chain_sum",
    "seed": 0,
    "task_args": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
}


def examples(n: int) -> list:
    """The first ``n`` examples of the workload."""
    from incentive.data import DataConfig, load_examples

    return load_examples(DataConfig(size=n, **DATA)).examples


def prompts(n: int) -> list[str]:
    return [e.prompt for e in examples(n)]


def matmul_gflops() -> dict[str, float]:
    """This machine's fp32 1024x1024 matmul rate through the default BLAS and through oneDNN (all threads as
    used); the larger is the denominator of utilisation."""
    import torch

    from incentive.models.onednn import onednn_available, onednn_linear

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    kernels = {"blas": lambda: a @ b}
    if onednn_available():
        kernels["onednn"] = lambda: onednn_linear(a, b)
    rates = {}
    for name, fn in kernels.items():
        for _ in range(3):
            fn()
        start, n = time.perf_counter(), 20
        for _ in range(n):
            fn()
        rates[name] = 2 * 1024**3 * n / (time.perf_counter() - start) / 1e9
    return rates


def run_trl(variant: str, steps: int, out: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import GenerationMixin, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from incentive.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("embedded")
    tokenizer.padding_side = "left"
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in prompts(PROMPTS * steps)]
    times: list[float] = []
    tokens: list[int] = []
    generate_s: list[float] = []
    # rendered, then tokenized: with tokenize=True newer transformers return a dict, whose len() is its key count
    prompt_tokens = [
        len(
            tokenizer(
                tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
                add_special_tokens=False,
            ).input_ids
        )
        for r in rows
    ]
    generate = GenerationMixin.generate

    def timed_generate(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return generate(*args, **kw)
        finally:
            generate_s.append(time.perf_counter() - start)

    GenerationMixin.generate = timed_generate

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            times.append(time.perf_counter() - self.start)

    def reward(completions, completion_ids, **kw):  # noqa: ANN001, ANN003
        tokens.append(sum(len(c) for c in completion_ids))
        return length_reward([c[0]["content"] for c in completions])

    peft_config = None
    if variant == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    config = GRPOConfig(
        output_dir=str(out.parent / "trl-out"),
        per_device_train_batch_size=PROMPTS * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS,
        learning_rate=1e-6,
        max_steps=steps,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        temperature=1.0,
        beta=0.0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=load_model("embedded", onednn=False),
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    out.write_text(
        json.dumps(
            {
                "step_s": times,
                "generate_s": generate_s,
                "train_s": [t - g for t, g in zip(times, generate_s, strict=True)],
                "gen_tokens": tokens,
                "context_tokens": [statistics.mean(prompt_tokens) * PROMPTS] * len(times),
            }
        )
    )


def run_incentive(variant: str, steps: int, out: Path, sampling_dtype: str) -> None:
    from incentive.config import Recipe
    from incentive.rewards.base import REWARDS, Reward, RewardResult
    from incentive.run import Run

    @REWARDS.register("bench-length")
    class Length(Reward):
        def __call__(self, batch, ctx):  # noqa: ANN001
            return RewardResult(length_reward([c.text for c in batch]))

    recipe = Recipe.model_validate(
        {
            "model": {
                "name": "embedded",
                "lora": {"r": 16, "alpha": 32, "dropout": 0.0} if variant == "lora" else None,
            },
            "data": {**DATA, "size": PROMPTS * steps},
            "generation": {
                "num_generations": GENERATIONS,
                "prompts_per_step": PROMPTS,
                "max_new_tokens": NEW_TOKENS,
                "sampling_dtype": sampling_dtype,
            },
            "rewards": [{"name": "bench-length"}],
            "optim": {"lr": 1e-6},
            "rl": {"steps": steps},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        Run(recipe, Path(tmp) / "run").execute()
        records = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rl"]
    out.write_text(
        json.dumps(
            {
                "step_s": [r["time/generate_s"] + r["time/reward_s"] + r["time/train_s"] for r in rl],
                "generate_s": [r["time/generate_s"] for r in rl],
                "train_s": [r["time/train_s"] for r in rl],
                "gen_tokens": [round(r["length/mean"] * r["completions"]) for r in rl],
                "context_tokens": [r.get("train/context_tokens", 0.0) for r in rl],
            }
        )
    )


def run_generation(tool: str, rounds: int, out: Path, sampling_dtype: str) -> None:
    """Sampling only: ``rounds`` batches of the workload (4 prompts x 4 samples, <= 64 new tokens) through
    incentive's engine (its own loading) or plain HF ``generate`` (the model as transformers loads it), both
    sampling in ``sampling_dtype``."""
    import torch

    from incentive.config import TemplateConfig
    from incentive.engines import ENGINES, SamplingParams
    from incentive.engines.cached import CachedEngine
    from incentive.models import load_model, load_tokenizer
    from incentive.run import build_template

    torch.manual_seed(0)
    tokenizer = load_tokenizer("embedded")
    dtype = getattr(torch, sampling_dtype)
    engine = (
        CachedEngine(load_model("embedded"), tokenizer, sampling_dtype=dtype)
        if tool == "incentive"
        else ENGINES.get("hf")(load_model("embedded", dtype=dtype, onednn=False), tokenizer)
    )
    workload = examples(PROMPTS * rounds)
    template = build_template(TemplateConfig())
    params = SamplingParams(n=GENERATIONS, max_new_tokens=NEW_TOKENS)
    seconds, tokens = [], []
    for k in range(rounds):
        chunk = workload[k * PROMPTS : (k + 1) * PROMPTS]
        prompts = [template.render(e, tokenizer) for e in chunk]
        start = time.perf_counter()
        batch = engine.generate(chunk, prompts, list(range(len(chunk))), params)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(c.length for c in batch))
    out.write_text(json.dumps({"generate_s": seconds, "gen_tokens": tokens}))


def child(tool: str, variant: str, steps: int, out: Path, sampling_dtype: str) -> None:
    if variant == "generation":
        run_generation(tool, steps, out, sampling_dtype)
    elif tool == "trl":
        run_trl(variant, steps, out)
    else:
        run_incentive(variant, steps, out, sampling_dtype)
    data = json.loads(out.read_text())
    data["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out.write_text(json.dumps(data))


def summarize(runs: list[dict], variant: str, rate: float) -> dict:
    """Medians and rates over every step but each run's first. Training utilisation counts the model FLOPs
    the update needs: 6 per parameter and token for full fine-tuning, 4 for LoRA (no weight gradients of the
    frozen base), over every completion token and one copy of each prompt."""
    tokens = [t for r in runs for t in r["gen_tokens"][1:]]
    gen = [s for r in runs for s in r["generate_s"][1:]]
    out: dict[str, float] = {
        "generation_tokens_per_s": sum(tokens) / sum(gen),
        "generation_utilisation": sum(tokens) * 2 * PARAMS / sum(gen) / 1e9 / rate,
        "median_generate_s": statistics.median(gen),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
    }
    if variant == "generation":
        return out
    steps = [s for r in runs for s in r["step_s"][1:]]
    train = [s for r in runs for s in r["train_s"][1:]]
    context = [c for r in runs for c in r["context_tokens"][1:]]
    flops_per_token = (4 if variant == "lora" else 6) * PARAMS
    out.update(
        {
            "median_step_s": statistics.median(steps),
            "tokens_per_s": sum(tokens) / sum(steps),
            "median_train_s": statistics.median(train),
            "training_tokens_per_s": sum(tokens) / sum(train),
            "training_utilisation": (sum(tokens) + sum(context)) * flops_per_token / sum(train) / 1e9 / rate,
        }
    )
    return out


def baseline_name(variant: str) -> str:
    return "HF generate" if variant == "generation" else "TRL"


def measured_matmul_rates(when: str) -> dict:
    """:func:`matmul_gflops` now, printed and labelled with ``when``."""
    rates = matmul_gflops()
    print(f"[bench] fp32 matmul GFLOP/s {when}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    return {"when": when, **rates}


def ratios(trl: dict, inc: dict) -> dict[str, float]:
    """TRL / incentive for time and memory, incentive / TRL for throughput."""
    out = {
        "generation_tokens_per_s_incentive_over_trl": inc["generation_tokens_per_s"]
        / trl["generation_tokens_per_s"],
        "peak_rss_incentive_over_trl": inc["peak_rss_gb"] / trl["peak_rss_gb"],
    }
    if "median_step_s" in trl:
        out["step_time_trl_over_incentive"] = trl["median_step_s"] / inc["median_step_s"]
        out["tokens_per_s_incentive_over_trl"] = inc["tokens_per_s"] / trl["tokens_per_s"]
        out["training_tokens_per_s_incentive_over_trl"] = (
            inc["training_tokens_per_s"] / trl["training_tokens_per_s"]
        )
    return out


def table(results: dict) -> str:
    """The markdown table of a results dict."""
    lines = [
        "| variant | tool | median step (s) | tokens/s | train tok/s | train util. | gen tok/s | gen util. "
        "| peak RSS (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, key: str, fmt: str, unit: str = "") -> str:
        return format(r[key], fmt) + unit if key in r else "-"

    for variant, v in results["variants"].items():
        for tool, name in (("trl", v["baseline"]), ("incentive", "incentive")):
            r = v[tool]
            lines.append(
                f"| {variant} | {name} | {cell(r, 'median_step_s', '.1f')} | {cell(r, 'tokens_per_s', '.1f')} "
                f"| {cell(r, 'training_tokens_per_s', '.1f')} | {cell(r, 'training_utilisation', '.0%')} "
                f"| {r['generation_tokens_per_s']:.1f} | {r['generation_utilisation']:.0%} "
                f"| {r['peak_rss_gb']:.2f} |"
            )
        q = v["ratios"]
        step = q.get("step_time_trl_over_incentive")
        lines.append(
            f"| {variant} | **ratio** | {f'{step:.2f}x' if step else '-'} "
            f"| {cell(q, 'tokens_per_s_incentive_over_trl', '.2f', 'x')} "
            f"| {cell(q, 'training_tokens_per_s_incentive_over_trl', '.2f', 'x')} | "
            f"| {q['generation_tokens_per_s_incentive_over_trl']:.2f}x | "
            f"| {q['peak_rss_incentive_over_trl']:.2f} of baseline |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["full", "lora", "generation"],
        choices=["full", "lora", "generation"],
    )
    parser.add_argument("--steps", type=int, default=4, help="steps (rounds) per run; the first is warm-up")
    parser.add_argument(
        "--reps", type=int, default=3, help="runs per tool and variant, alternating (1 for a quick look)"
    )
    parser.add_argument(
        "--sampling-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: incentive samples from a bf16 copy (needs AMX), HF generate runs in bf16",
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("TOOL", "VARIANT", "STEPS", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        tool, variant, steps, out = args.child
        child(tool, variant, int(steps), Path(out), args.sampling_dtype)
        return
    rates = [measured_matmul_rates("before the runs")]
    results: dict = {
        "machine": {
            "matmul_gflops": rates,
            "cpu_threads": __import__("torch").get_num_threads(),
        },
        "workload": {
            "prompts": PROMPTS,
            "generations": GENERATIONS,
            "max_new_tokens": NEW_TOKENS,
            "steps": args.steps,
            "reps": args.reps,
            "sampling_dtype": args.sampling_dtype,
        },
        "variants": {},
    }
    progress = Progress("bench", len(args.variants) * args.reps * 2)
    raws: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            raw: dict[str, list[dict]] = {"trl": [], "incentive": []}
            baseline = baseline_name(variant)
            for rep in range(args.reps):
                for tool in ("trl", "incentive"):
                    out = Path(tmp) / f"{tool}-{variant}-{rep}.json"
                    name = baseline if tool == "trl" else tool
                    progress.start(f"{variant}: {name}, repetition {rep + 1}/{args.reps}")
                    subprocess.run(
                        [
                            *(sys.executable, __file__, "--sampling-dtype", args.sampling_dtype),
                            *("--child", tool, variant, str(args.steps), str(out)),
                        ],
                        check=True,
                        cwd=ROOT,
                    )
                    raw[tool].append(json.loads(out.read_text()))
            raws[variant] = raw
            rates.append(measured_matmul_rates(f"after {variant}"))
    rate = max(r for sample in rates for name, r in sample.items() if name != "when")
    results["machine"]["utilisation_denominator_gflops"] = rate
    for variant, raw in raws.items():
        trl, inc = summarize(raw["trl"], variant, rate), summarize(raw["incentive"], variant, rate)
        results["variants"][variant] = {
            "baseline": baseline_name(variant),
            "trl": trl,
            "incentive": inc,
            "raw": raw,
            "ratios": ratios(trl, inc),
        }
    target = ROOT / "bench" / "results"
    target.mkdir(parents=True, exist_ok=True)
    name = "grpo_vs_trl" if args.sampling_dtype == "float32" else f"grpo_vs_trl_{args.sampling_dtype}"
    (target / f"{name}.json").write_text(json.dumps(results, indent=2))
    markdown = table(results)
    (target / f"{name}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
