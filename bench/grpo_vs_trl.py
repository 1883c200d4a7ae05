"""Side-by-side GRPO benchmark: incentive vs TRL's GRPOTrainer on the same workload, same machine, same run.

    .venv/bin/python bench/grpo_vs_trl.py                 # full fine-tune and LoRA r=16, alternating tools
    .venv/bin/python bench/grpo_vs_trl.py --variants full --steps 4 --reps 2
    .venv/bin/python bench/grpo_vs_trl.py --workload long --steps 2 --reps 1   # reasoning lengths
    .venv/bin/python bench/grpo_vs_trl.py --sampling-dtype bfloat16   # CPUs with AMX: incentive samples in bf16

Workloads (``--workload``), on the embedded SmolLM2-135M in fp32 on the CPU:
- ``short`` (default): 4 prompts x 4 completions per step, <= 64 new tokens, a reward whose values vary within
  every group (closeness of the completion's length to 120 characters);
- ``long``: 8 prompts x 8 completions, exactly 512 new tokens each (no end token is sampled before 512, in both
  tools: ``generation.min_new_tokens`` and ``generate``'s ``min_new_tokens``), a reward that varies with the text
  (its share of digits); TRL trains in micro-batches of 8 completions (64 would not fit in this machine's
  memory) and runs once with gradient checkpointing off and once on, and incentive once with its defaults and
  once with ``model.activation_checkpointing``.
Both tools do real work each step. Each (tool, variant, repetition) runs in its own process so peak RSS is its
own. TRL gets the model as transformers loads it (default kernels); incentive its own loading (oneDNN linears on
AMD CPUs). The first step of every run is warm-up and is left out of the medians. A generation-only comparison
(the same prompts and lengths) pits incentive's engine against plain HF ``generate``. Writes
bench/results/grpo_vs_trl-WORKLOAD-MACHINE.{json,md} (MACHINE: the CPU kind, e.g. amd-epyc) with ratios (TRL /
incentive for time and memory, incentive / TRL for throughput; against TRL's fastest and leanest setting where it
ran more than one) and utilisation: model FLOPs per second over the best fp32 matmul rate measured here (before
the first run and after each variant's runs: the rate of a shared VM drifts by the hour, and the best one
measured is the strictest yardstick).
With ``--sampling-dtype bfloat16`` incentive samples from a bf16 copy of the policy (``generation.sampling_dtype``)
and HF ``generate`` runs a bf16 model; TRL's trainer samples with its fp32 training model as always. Those results
go to grpo_vs_trl-WORKLOAD-MACHINE-bfloat16.{json,md}. With ``--bf16-update`` both tools update in bf16 mixed
precision (TRL ``bf16=True``, autocast over fp32 weights, which its sampling runs under too; incentive
``model.update_products: bfloat16``); those results go to grpo_vs_trl-WORKLOAD-MACHINE-bf16-update.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from progress import Progress

from incentive.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
    """What one step samples and trains, the same for both tools."""

    prompts: int = 4
    generations: int = 4
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    reward: str = "length"
    model: str = "embedded"
    trl_micro_batch: int | None = None
    """Completions per TRL forward/backward pass (gradient accumulation over the step); None: all at once."""
    checkpointing: bool = False
    """TRL: gradient checkpointing; incentive: ``model.activation_checkpointing``."""
    trl_bf16: bool = False
    """TRL in bf16 mixed precision (``bf16=True``: autocast over fp32 weights)."""
    update_products: str = "float32"
    """incentive's ``model.update_products`` (bfloat16: its update's linear products in bf16)."""


WORKLOADS = {
    "short": Workload(),
    "long": Workload(
        prompts=8, generations=8, max_new_tokens=512, min_new_tokens=512, reward="digits", trl_micro_batch=8
    ),
}
SETTINGS = {"short": (False,), "long": (False, True)}
"""The checkpointing settings each tool runs with, per workload."""


def length_reward(texts: list[str]) -> list[float]:
    """Varies within every group: 1 at 120 characters, falling off linearly."""
    return [max(0.0, 1.0 - abs(len(t) - 120) / 120) for t in texts]


def digits_reward(texts: list[str]) -> list[float]:
    """Varies with the text when every completion has the same length: its share of digits."""
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def hash_reward(texts: list[str]) -> list[float]:
    """Varies whenever the texts differ, whatever they hold (a random-initialised model writes no digits, and a
    group whose rewards are all equal trains nothing in incentive): a hash of the text in [0, 1)."""
    return [zlib.crc32(t.encode()) % 1000 / 1000 for t in texts]


REWARDS = {"length": length_reward, "digits": digits_reward, "hash": hash_reward}


def machine_kind(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str | bool]:
    """The CPU's vendor and model name, and a short kind for file names (amd-epyc, intel-xeon, ...)."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(fields.get("vendor_id", ""), platform.machine())
    model = fields.get("model name", "")
    words = re.sub(r"\((r|tm)\)", " ", model.lower()).split()
    family = next((w for w in words if w in {"epyc", "xeon", "ryzen", "core"}), "cpu")
    flags = fields.get("flags", "").split()
    return {
        "kind": f"{vendor}-{family}",
        "vendor_id": fields.get("vendor_id", ""),
        "model_name": model,
        "avx512": "avx512f" in flags,
        "amx": "amx_tile" in flags,
    }


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


def run_trl(variant: str, steps: int, out: Path, work: Workload) -> None:
    import torch
    from datasets import Dataset
    from transformers import GenerationMixin, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from incentive.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(work.model)
    tokenizer.padding_side = "left"
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in prompts(work.prompts * steps)]
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
        return REWARDS[work.reward]([c[0]["content"] for c in completions])

    peft_config = None
    if variant == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    completions = work.prompts * work.generations
    micro = work.trl_micro_batch or completions
    config = GRPOConfig(
        output_dir=str(out.parent / "trl-out"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=completions // micro,
        num_generations=work.generations,
        max_completion_length=work.max_new_tokens,
        generation_kwargs={"min_new_tokens": work.min_new_tokens} if work.min_new_tokens else None,
        learning_rate=1e-6,
        max_steps=steps,
        gradient_checkpointing=work.checkpointing,
        use_cpu=True,
        bf16=work.trl_bf16,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        temperature=1.0,
        beta=0.0,
        disable_tqdm=True,
    )
    model = load_model(work.model, onednn=False)
    trainer = GRPOTrainer(
        model=model,
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
                "context_tokens": [statistics.mean(prompt_tokens) * work.prompts] * len(times),
                "params": sum(p.numel() for p in model.parameters()),
            }
        )
    )


def run_incentive(variant: str, steps: int, out: Path, sampling_dtype: str, work: Workload) -> None:
    from incentive.config import Recipe
    from incentive.rewards.base import REWARDS as REGISTERED
    from incentive.rewards.base import Reward, RewardResult
    from incentive.run import Run

    @REGISTERED.register("bench-reward")
    class Bench(Reward):
        def __call__(self, batch, ctx):  # noqa: ANN001
            return RewardResult(REWARDS[work.reward]([c.text for c in batch]))

    recipe = Recipe.model_validate(
        {
            "model": {
                "name": work.model,
                "lora": {"r": 16, "alpha": 32, "dropout": 0.0} if variant == "lora" else None,
                "activation_checkpointing": work.checkpointing,
                "update_products": work.update_products,
            },
            "data": {**DATA, "size": work.prompts * steps},
            "generation": {
                "num_generations": work.generations,
                "prompts_per_step": work.prompts,
                "max_new_tokens": work.max_new_tokens,
                "min_new_tokens": work.min_new_tokens,
                "sampling_dtype": sampling_dtype,
            },
            "rewards": [{"name": "bench-reward"}],
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
                "params": params_of(work.model),
            }
        )
    )


def params_of(model: str) -> int:
    """Parameters of ``model`` as loaded (on the meta device: nothing is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from incentive.models import load_model

    if model == "embedded":
        return sum(p.numel() for p in load_model(model).parameters())
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())


def run_generation(tool: str, rounds: int, out: Path, sampling_dtype: str, work: Workload) -> None:
    """Sampling only: ``rounds`` batches of the workload through incentive's engine (its own loading) or plain
    HF ``generate`` (the model as transformers loads it), both sampling in ``sampling_dtype``."""
    import torch

    from incentive.config import TemplateConfig
    from incentive.engines import ENGINES, SamplingParams
    from incentive.engines.cached import CachedEngine
    from incentive.models import load_model, load_tokenizer
    from incentive.run import build_template

    torch.manual_seed(0)
    tokenizer = load_tokenizer(work.model)
    dtype = getattr(torch, sampling_dtype)
    model = (
        load_model(work.model) if tool == "incentive" else load_model(work.model, dtype=dtype, onednn=False)
    )
    engine = (
        CachedEngine(model, tokenizer, sampling_dtype=dtype)
        if tool == "incentive"
        else ENGINES.get("hf")(model, tokenizer)
    )
    workload = examples(work.prompts * rounds)
    template = build_template(TemplateConfig())
    params = SamplingParams(
        n=work.generations, max_new_tokens=work.max_new_tokens, min_new_tokens=work.min_new_tokens
    )
    seconds, tokens = [], []
    for k in range(rounds):
        chunk = workload[k * work.prompts : (k + 1) * work.prompts]
        prompts = [template.render(e, tokenizer) for e in chunk]
        start = time.perf_counter()
        batch = engine.generate(chunk, prompts, list(range(len(chunk))), params)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(c.length for c in batch))
    out.write_text(
        json.dumps(
            {"generate_s": seconds, "gen_tokens": tokens, "params": sum(p.numel() for p in model.parameters())}
        )
    )


def child(tool: str, variant: str, steps: int, out: Path, sampling_dtype: str, work: Workload) -> None:
    if variant == "generation":
        run_generation(tool, steps, out, sampling_dtype, work)
    elif tool == "trl":
        run_trl(variant, steps, out, work)
    else:
        run_incentive(variant, steps, out, sampling_dtype, work)
    data = json.loads(out.read_text())
    data["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out.write_text(json.dumps(data))


def run_child(
    tool: str, variant: str, steps: int, out: Path, sampling_dtype: str, work: Workload, reuse: bool = False
) -> dict:
    """:func:`child` in a process of its own (so its peak RSS is its own); its results, which stay in ``out``.
    With ``reuse``, results already in ``out`` for the same workload and steps are taken instead of a run."""
    if reuse and out.exists():
        kept = json.loads(out.read_text())
        spec = {**asdict(Workload()), **kept["spec"]} if "spec" in kept else None  # newer fields: defaults
        if spec == asdict(work) and len(kept["step_s" if "step_s" in kept else "generate_s"]) == steps:
            print(f"[bench] reusing {out}", flush=True)
            return kept
    subprocess.run(
        [
            *(sys.executable, str(Path(__file__).resolve()), "--sampling-dtype", sampling_dtype),
            *("--child", tool, variant, str(steps), str(out), "--spec", json.dumps(asdict(work))),
        ],
        check=True,
        cwd=ROOT,
    )
    result = {**json.loads(out.read_text()), "spec": asdict(work)}
    out.write_text(json.dumps(result))
    return result


def summarize(runs: list[dict], variant: str, rate: float) -> dict:
    """Medians and rates over every step but each run's first. Training utilisation counts the model FLOPs
    the update needs: 6 per parameter and token for full fine-tuning, 4 for LoRA (no weight gradients of the
    frozen base), over every completion token and one copy of each prompt."""
    params = runs[0]["params"]
    tokens = [t for r in runs for t in r["gen_tokens"][1:]]
    gen = [s for r in runs for s in r["generate_s"][1:]]
    out: dict[str, float] = {
        "generation_tokens_per_s": sum(tokens) / sum(gen),
        "generation_utilisation": sum(tokens) * 2 * params / sum(gen) / 1e9 / rate,
        "median_generate_s": statistics.median(gen),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
    }
    if variant == "generation":
        return out
    steps = [s for r in runs for s in r["step_s"][1:]]
    train = [s for r in runs for s in r["train_s"][1:]]
    context = [c for r in runs for c in r["context_tokens"][1:]]
    flops_per_token = (4 if variant == "lora" else 6) * params
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


def setting_name(checkpointing: bool) -> str:
    return "checkpointing" if checkpointing else "default"


def tool_label(tool: str, variant: str, setting: str) -> str:
    name = baseline_name(variant) if tool == "trl" else "incentive"
    if setting == "checkpointing":
        name += " + grad. checkpointing" if tool == "trl" else " + activation checkpointing"
    return name


def against_trl_best(settings: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each incentive setting against TRL's fastest setting (time, throughput) and its leanest (memory)."""
    trls = [v["trl"] for v in settings.values()]
    fastest = min(trls, key=lambda r: r.get("median_step_s", 1 / r["generation_tokens_per_s"]))
    leanest = min(trls, key=lambda r: r["peak_rss_gb"])
    out = {}
    for setting, v in settings.items():
        q = ratios(fastest, v["incentive"])
        q["peak_rss_incentive_over_trl"] = v["incentive"]["peak_rss_gb"] / leanest["peak_rss_gb"]
        out[setting] = q
    return out


def table(results: dict) -> str:
    """The markdown table of a results dict: each tool and setting, then incentive's ratios against TRL's
    fastest setting (time, throughput) and its leanest (memory)."""
    lines = [
        "| variant | tool | median step (s) | tokens/s | train tok/s | train util. | gen tok/s | gen util. "
        "| peak RSS (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, key: str, fmt: str, unit: str = "") -> str:
        return format(r[key], fmt) + unit if key in r else "-"

    for variant, v in results["variants"].items():
        for tool in ("trl", "incentive"):
            for setting, runs in v["settings"].items():
                r = runs[tool]
                lines.append(
                    f"| {variant} | {tool_label(tool, variant, setting)} | {cell(r, 'median_step_s', '.1f')} "
                    f"| {cell(r, 'tokens_per_s', '.1f')} | {cell(r, 'training_tokens_per_s', '.1f')} "
                    f"| {cell(r, 'training_utilisation', '.0%')} | {r['generation_tokens_per_s']:.1f} "
                    f"| {r['generation_utilisation']:.0%} | {r['peak_rss_gb']:.2f} |"
                )
        for setting, q in v["ratios"].items():
            step = q.get("step_time_trl_over_incentive")
            label = "**ratio**" if len(v["ratios"]) == 1 else f"**ratio**, {tool_label('incentive', variant, setting)}"
            lines.append(
                f"| {variant} | {label} | {f'{step:.2f}x' if step else '-'} "
                f"| {cell(q, 'tokens_per_s_incentive_over_trl', '.2f', 'x')} "
                f"| {cell(q, 'training_tokens_per_s_incentive_over_trl', '.2f', 'x')} | "
                f"| {q['generation_tokens_per_s_incentive_over_trl']:.2f}x | "
                f"| {q['peak_rss_incentive_over_trl']:.2f} of baseline |"
            )
    return "\n".join(lines) + "\n"


def results_name(workload: str, sampling_dtype: str, bf16_update: bool = False) -> str:
    """The results' file stem: workload, machine kind, the sampling dtype where it is not fp32, and whether the
    updates ran in bf16 mixed precision."""
    name = f"grpo_vs_trl-{workload}-{machine_kind()['kind']}"
    name = name if sampling_dtype == "float32" else f"{name}-{sampling_dtype}"
    return f"{name}-bf16-update" if bf16_update else name


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
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="short")
    parser.add_argument("--steps", type=int, default=4, help="steps (rounds) per run; the first is warm-up")
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=["default", "checkpointing"],
        help="checkpointing settings to run (default: the workload's; long runs both)",
    )
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
        "--bf16-update",
        action="store_true",
        help="both tools update in bf16 mixed precision (TRL bf16=True, incentive model.update_products: bfloat16)",
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("TOOL", "VARIANT", "STEPS", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs an interrupted invocation finished (kept in the cache's bench/NAME folder)",
    )
    args = parser.parse_args()
    if args.child:
        tool, variant, steps, out = args.child
        child(tool, variant, int(steps), Path(out), args.sampling_dtype, Workload(**json.loads(args.spec)))
        return
    work = WORKLOADS[args.workload]
    if args.bf16_update:
        work = replace(work, trl_bf16=True, update_products="bfloat16")
    rates = [measured_matmul_rates("before the runs")]
    results: dict = {
        "machine": {
            **machine_kind(),
            "matmul_gflops": rates,
            "cpu_threads": __import__("torch").get_num_threads(),
        },
        "workload": {
            "name": args.workload,
            **asdict(work),
            "steps": args.steps,
            "reps": args.reps,
            "sampling_dtype": args.sampling_dtype,
        },
        "variants": {},
    }
    plan = [
        (variant, checkpointing)
        for variant in args.variants
        for checkpointing in (SETTINGS[args.workload] if variant != "generation" else (False,))
        if args.settings is None or setting_name(checkpointing) in args.settings
    ]
    progress = Progress("bench", len(plan) * args.reps * 2)
    raws: dict[str, dict[str, dict[str, list[dict]]]] = {}
    name = results_name(args.workload, args.sampling_dtype, args.bf16_update)
    kept = cache_dir() / "bench" / name
    if not args.resume:
        shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True, exist_ok=True)
    for variant, checkpointing in plan:
        setting = setting_name(checkpointing)
        raw: dict[str, list[dict]] = {"trl": [], "incentive": []}
        for rep in range(args.reps):
            for tool in ("trl", "incentive"):
                out = kept / f"{tool}-{variant}-{setting}-{rep}.json"
                progress.start(f"{variant}: {tool_label(tool, variant, setting)}, repetition {rep + 1}/{args.reps}")
                spec = replace(work, checkpointing=checkpointing)
                raw[tool].append(run_child(tool, variant, args.steps, out, args.sampling_dtype, spec, args.resume))
        raws.setdefault(variant, {})[setting] = raw
        rates.append(measured_matmul_rates(f"after {variant}, {setting}"))
    rate = max(r for sample in rates for name, r in sample.items() if isinstance(r, float))
    results["machine"]["utilisation_denominator_gflops"] = rate
    for variant, by_setting in raws.items():
        settings = {
            setting: {
                "trl": summarize(raw["trl"], variant, rate),
                "incentive": summarize(raw["incentive"], variant, rate),
                "raw": raw,
            }
            for setting, raw in by_setting.items()
        }
        results["variants"][variant] = {
            "baseline": baseline_name(variant),
            "settings": settings,
            "ratios": against_trl_best(settings),
        }
    target = ROOT / "bench" / "results"
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{name}.json").write_text(json.dumps(results, indent=2))
    markdown = f"Machine: {results['machine']['model_name']} ({results['machine']['kind']}).\n\n" + table(results)
    (target / f"{name}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
