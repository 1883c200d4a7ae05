"""Side-by-side GRPO benchmark: incentive vs TRL's GRPOTrainer on the same workload, same machine, same run.

    .venv/bin/python bench/grpo_vs_trl.py                 # full fine-tune and LoRA r=16, alternating tools
    .venv/bin/python bench/grpo_vs_trl.py --variants full --steps 4 --reps 2

Workload: the embedded SmolLM2-135M, 4 prompts x 4 completions per step, <= 64 new tokens, fp32 on the CPU, a
reward whose values vary within every group (closeness of the completion's length to 120 characters), so both
tools do real work each step. Each (tool, variant, repetition) runs in its own process so peak RSS is its own.
The first step of every run is warm-up and is left out of the medians. Writes bench/results/grpo_vs_trl.json
and .md with ratios (TRL / incentive for time and memory, incentive / TRL for throughput).
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


def prompts(n: int) -> list[str]:
    from incentive.data import DataConfig, load_examples

    cfg = DataConfig(
        source="task:chain_sum",
        size=n,
        seed=0,
        task_args={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    )
    return [e.prompt for e in load_examples(cfg).examples]


def matmul_gflops() -> float:
    """This machine's fp32 matmul rate (2 threads as used), the denominator of utilisation."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - start) / 1e9


def run_trl(variant: str, steps: int, out: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from incentive.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("embedded")
    tokenizer.padding_side = "left"
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in prompts(PROMPTS * steps)]
    times: list[float] = []
    tokens: list[int] = []

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

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
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
        model=load_model("embedded"),
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    out.write_text(json.dumps({"step_s": times, "gen_tokens": tokens}))


def run_incentive(variant: str, steps: int, out: Path) -> None:
    from incentive.config import Recipe
    from incentive.rewards.base import REWARDS, Reward, RewardResult
    from incentive.run import Run

    @REWARDS.register("bench-length")
    class Length(Reward):
        def __call__(self, batch, ctx):  # noqa: ANN001
            return RewardResult(length_reward([c.text for c in batch]))

    recipe = Recipe.model_validate(
        {
            "model": {"name": "embedded", "lora": {"r": 16, "alpha": 32} if variant == "lora" else None},
            "data": {
                "source": "task:chain_sum",
                "size": PROMPTS * steps,
                "seed": 0,
                "task_args": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
            },
            "generation": {
                "num_generations": GENERATIONS,
                "prompts_per_step": PROMPTS,
                "max_new_tokens": NEW_TOKENS,
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
            }
        )
    )


def child(tool: str, variant: str, steps: int, out: Path) -> None:
    (run_trl if tool == "trl" else run_incentive)(variant, steps, out)
    data = json.loads(out.read_text())
    data["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out.write_text(json.dumps(data))


def summarize(runs: list[dict], rate: float) -> dict:
    steps = [s for r in runs for s in r["step_s"][1:]]
    tokens = [t for r in runs for t in r["gen_tokens"][1:]]
    out = {
        "median_step_s": statistics.median(steps),
        "tokens_per_s": sum(tokens) / sum(steps),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
    }
    if "generate_s" in runs[0]:
        gen = [s for r in runs for s in r["generate_s"][1:]]
        train = [s for r in runs for s in r["train_s"][1:]]
        out["generation_tokens_per_s"] = sum(tokens) / sum(gen)
        out["generation_utilisation"] = out["generation_tokens_per_s"] * 2 * PARAMS / 1e9 / rate
        out["median_generate_s"] = statistics.median(gen)
        out["median_train_s"] = statistics.median(train)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--steps", type=int, default=3, help="steps per run; the first is warm-up")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument(
        "--child", nargs=4, metavar=("TOOL", "VARIANT", "STEPS", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        tool, variant, steps, out = args.child
        child(tool, variant, int(steps), Path(out))
        return
    rate = matmul_gflops()
    print(f"[bench] fp32 matmul: {rate:.1f} GFLOP/s")
    results: dict = {
        "machine": {"matmul_gflops": rate, "cpu_threads": __import__("torch").get_num_threads()},
        "workload": {
            "prompts": PROMPTS,
            "generations": GENERATIONS,
            "max_new_tokens": NEW_TOKENS,
            "steps": args.steps,
            "reps": args.reps,
        },
        "variants": {},
    }
    progress = Progress("bench", len(args.variants) * args.reps * 2)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            raw: dict[str, list[dict]] = {"trl": [], "incentive": []}
            for rep in range(args.reps):
                for tool in ("trl", "incentive"):
                    out = Path(tmp) / f"{tool}-{variant}-{rep}.json"
                    progress.start(f"{variant}: {tool}, repetition {rep + 1}/{args.reps}")
                    subprocess.run(
                        [sys.executable, __file__, "--child", tool, variant, str(args.steps), str(out)],
                        check=True,
                        cwd=ROOT,
                    )
                    raw[tool].append(json.loads(out.read_text()))
            trl, inc = summarize(raw["trl"], rate), summarize(raw["incentive"], rate)
            results["variants"][variant] = {
                "trl": trl,
                "incentive": inc,
                "raw": raw,
                "ratios": {
                    "step_time_trl_over_incentive": trl["median_step_s"] / inc["median_step_s"],
                    "tokens_per_s_incentive_over_trl": inc["tokens_per_s"] / trl["tokens_per_s"],
                    "peak_rss_incentive_over_trl": inc["peak_rss_gb"] / trl["peak_rss_gb"],
                },
            }
    target = ROOT / "bench" / "results"
    target.mkdir(parents=True, exist_ok=True)
    (target / "grpo_vs_trl.json").write_text(json.dumps(results, indent=2))
    lines = [
        "| variant | tool | median step (s) | tokens/s | peak RSS (GB) | gen tok/s | gen util. |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, v in results["variants"].items():
        for tool in ("trl", "incentive"):
            r = v[tool]
            gen = f"{r['generation_tokens_per_s']:.1f}" if "generation_tokens_per_s" in r else "-"
            util = f"{r['generation_utilisation']:.0%}" if "generation_utilisation" in r else "-"
            lines.append(
                f"| {variant} | {tool} | {r['median_step_s']:.1f} | {r['tokens_per_s']:.1f} | "
                f"{r['peak_rss_gb']:.2f} | {gen} | {util} |"
            )
        ratio = v["ratios"]
        lines.append(
            f"| {variant} | **ratio** | TRL/incentive {ratio['step_time_trl_over_incentive']:.2f}x | "
            f"{ratio['tokens_per_s_incentive_over_trl']:.2f}x | "
            f"{ratio['peak_rss_incentive_over_trl']:.2f} of TRL | | |"
        )
    (target / "grpo_vs_trl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
