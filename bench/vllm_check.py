"""The vLLM engine on a real GPU: does it sample what the HF model samples, and how fast is it?

Run on a machine with a CUDA GPU, after `pip install 'incentive[vllm]'` (vLLM brings its own CUDA torch):

    python bench/vllm_check.py            # writes bench/results/vllm_check.json; exit status 1 if a check fails

Checks (the same as the GPU tests in tests/test_vllm_engine.py): greedy vLLM output equals HF ``generate`` token
for token on the tiny random model and on the embedded SmolLM2-135M; sampled tokens' logprobs at temperature
0.7 equal the HF model's teacher-forced ones; after optimizer steps (full fine-tune, and a LoRA adapter served
unmerged) greedy vLLM output equals the updated HF model's. Then tokens/s at batch 16 (4 prompts x 4 samples,
<= 64 new tokens, temperature 1) with the embedded model: vLLM on the GPU against the cached engine where this
project runs it (fp32 on the CPU). On a machine without vLLM or a CUDA GPU it says so and exits with status 2.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from incentive.config import TemplateConfig, VLLMConfig
from incentive.data import DataConfig, load_examples
from incentive.engines import ENGINES, Engine, SamplingParams, VLLMEngine
from incentive.engines.vllm import VLLMUnavailable, require_vllm
from incentive.models import load_model, load_tokenizer
from incentive.run import build_template

OUT = Path(__file__).resolve().parent / "results" / "vllm_check.json"
OPTIONS = VLLMConfig(gpu_memory_utilization=0.15, max_model_len=1024)
PROMPTS, SAMPLES, NEW_TOKENS = 4, 4, 64


def workload(tokenizer: Any, n: int = PROMPTS) -> tuple[list, list[str]]:
    """``n`` chain-sum examples and their prompts (the benchmark workload's data)."""
    cfg = DataConfig(source="task:chain_sum", size=n, seed=0, task_args={"min_terms": 2, "max_terms": 3})
    examples = load_examples(cfg).examples
    template = build_template(TemplateConfig())
    return examples, [template.render(e, tokenizer) for e in examples]


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
    tokenizer, model = load_tokenizer("tiny-random"), load_model("tiny-random")
    examples, prompts = workload(tokenizer)
    hf, engine = ENGINES.get("hf")(model, tokenizer), VLLMEngine(model, tokenizer, options=OPTIONS)
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
    policy = get_peft_model(load_model("tiny-random"), lora)
    examples, prompts = workload(tokenizer)
    hf, engine = ENGINES.get("hf")(policy, tokenizer), VLLMEngine(policy, tokenizer, options=OPTIONS)
    out = {"greedy": compare(engine, hf, examples, prompts)}
    step_towards(policy, 42, lr=2.0, steps=3)
    engine.weights_changed()
    out["after_update"] = compare(engine, hf, examples, prompts)
    return out


def tokens_per_second(engine: Engine, examples: list, prompts: list[str], reps: int) -> dict[str, float]:
    """Median tokens/s over ``reps`` timed batches after one warm-up batch."""
    params = SamplingParams(n=SAMPLES, max_new_tokens=NEW_TOKENS, temperature=1.0)
    engine.generate(examples, prompts, list(range(len(prompts))), params)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        batch = engine.generate(examples, prompts, list(range(len(prompts))), params)
        rates.append(sum(c.length for c in batch) / (time.perf_counter() - start))
    return {"tokens_per_s": sorted(rates)[len(rates) // 2], "reps": float(reps)}


def check_embedded() -> dict[str, Any]:
    """Embedded model: greedy equality with HF, then vLLM's and the cached engine's speed at batch 16."""
    tokenizer, model = load_tokenizer("embedded"), load_model("embedded")
    examples, prompts = workload(tokenizer, PROMPTS)
    hf, engine = ENGINES.get("hf")(model, tokenizer), VLLMEngine(model, tokenizer, options=OPTIONS)
    out: dict[str, Any] = {"greedy": compare(engine, hf, examples, prompts, 40)}
    vllm_speed = tokens_per_second(engine, examples, prompts, reps=5)
    cached_speed = tokens_per_second(ENGINES.get("cached")(model, tokenizer), examples, prompts, reps=3)
    out["throughput_batch16"] = {
        "vllm_gpu": vllm_speed,
        "cached_cpu": cached_speed,
        "ratio_vllm_over_cached": vllm_speed["tokens_per_s"] / cached_speed["tokens_per_s"],
    }
    return out


def passed(results: dict[str, Any]) -> bool:
    """Every check agreed (logprobs within 2e-3, greedy output equal, the update visible)."""
    tiny, lora, embedded = results["tiny"], results["lora"], results["embedded"]
    return (
        tiny["greedy"]["equal"]
        and tiny["logprob_max_abs_error"] < 2e-3
        and tiny["after_update"]["equal"]
        and tiny["after_update"]["hf_changed"]
        and lora["greedy"]["equal"]
        and lora["after_update"]["equal"]
        and embedded["greedy"]["equal"]
    )


def main() -> int:
    """Run every check, write the JSON, print a summary; 0 if all passed, 1 if not, 2 if vLLM cannot run."""
    try:
        require_vllm()
    except VLLMUnavailable as err:
        print(f"[vllm_check] cannot run here: {err}", file=sys.stderr)
        return 2
    import vllm

    results: dict[str, Any] = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
        },
        "tiny": check_tiny(),
        "lora": check_lora(),
        "embedded": check_embedded(),
    }
    results["passed"] = passed(results)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    speed = results["embedded"]["throughput_batch16"]
    print(
        f"[vllm_check] {'all checks passed' if results['passed'] else 'A CHECK FAILED'}; batch 16: vLLM "
        f"{speed['vllm_gpu']['tokens_per_s']:.0f} tok/s, cached engine (CPU) "
        f"{speed['cached_cpu']['tokens_per_s']:.0f} tok/s; details in {OUT}"
    )
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
