"""The vLLM engine: on CPU against a fake ``vllm`` module (what it asks vLLM for and how it reads the answer, weight
and adapter sync, the errors where vLLM cannot run); on a CUDA machine with vLLM installed, against HF generate."""

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from incentive.config import ConfigError, GenerationConfig, VLLMConfig, load_recipe
from incentive.engines import ENGINES, SamplingParams, VLLMEngine
from incentive.engines import vllm as vllm_engine
from incentive.engines.vllm import VLLMUnavailable, cpu_build, lora_rank_slot
from incentive.models import load_model, load_tokenizer
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch
from incentive.run import Run
from incentive.training.rl import RLTrainer

ROOT = Path(__file__).resolve().parents[1]


def from_check_script(name: str):
    """A helper of the GPU check script (``bench/vllm_check.py``), which the real-vLLM tests share."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import vllm_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return getattr(vllm_check, name)


def prompts_for(tokenizer, n=4):
    """``n`` chain-sum examples and their rendered prompts (written by the check script: no task library)."""
    return from_check_script("workload")(tokenizer, n)


def step_towards(model, token: int, lr: float = 0.5, steps: int = 1) -> None:
    """The GPU check script's weight change that greedy decoding shows."""
    change = from_check_script("step_towards")
    change(model, token, lr, steps)


# -- a fake vllm module ---------------------------------------------------------------------------------------


@dataclass
class FakeLogprob:
    logprob: float


@dataclass
class FakeSample:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]]
    finish_reason: str


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeSample]


class FakeSamplingParams:
    """Records its keyword arguments."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeLoRARequest:
    """Records name, id and path, as vLLM's ``LoRARequest(lora_name, lora_int_id, lora_path)``."""

    def __init__(self, name: str, int_id: int, path: str) -> None:
        self.name, self.int_id, self.path = name, int_id, path


class FakeWorker:
    """vLLM's worker: records every ``reload_weights`` from tensors in checkpoint format."""

    def __init__(self) -> None:
        self.loads: list[dict[str, torch.Tensor]] = []

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True) -> None:
        assert weights_iterator is not None and weights_path is None and is_checkpoint_format
        self.loads.append({name: t.detach().clone() for name, t in weights_iterator})


class FakeHeadMethod:
    """The LM head's loading step in vLLM's model (``quant_method``): counts how often it ran."""

    def __init__(self) -> None:
        self.runs = 0

    def process_weights_after_loading(self, layer) -> None:
        self.runs += 1


class FakeModel:
    """vLLM's model, as ``apply_model`` hands it over: only its LM head."""

    def __init__(self) -> None:
        self.lm_head = SimpleNamespace(quant_method=FakeHeadMethod())


def fake_sample(prompt: list[int], j: int, kw: dict[str, Any]) -> FakeSample:
    """Sample j of a prompt: even j end on the first stop id after 3 tokens, odd j run to ``max_tokens``. Each
    step's logprob dict also holds a likelier token that was not sampled (vLLM's top-k entries)."""
    base = 100 + len(prompt) + 10 * j
    if j % 2 == 0:
        tokens, reason = [base, base + 1, kw["stop_token_ids"][0]], "stop"
    else:
        tokens, reason = [base + k for k in range(kw["max_tokens"])], "length"
    steps = [{t: FakeLogprob(-(k + 1) / 10 - j), t + 1000: FakeLogprob(-0.01)} for k, t in enumerate(tokens)]
    return FakeSample(j, tokens, steps, reason)


class FakeLLM:
    """Records its constructor arguments, generate calls, weight loads and prefix-cache resets."""

    instances: list["FakeLLM"] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[list[dict], FakeSamplingParams, Any]] = []
        self.worker = FakeWorker()
        self.model = FakeModel()
        self.prefix_resets = 0
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, *, use_tqdm=True, lora_request=None):
        self.calls.append((prompts, sampling_params, lora_request))
        kw = sampling_params.kwargs
        return [
            FakeRequestOutput(
                p["prompt_token_ids"],
                [fake_sample(p["prompt_token_ids"], j, kw) for j in reversed(range(kw["n"]))],
            )
            for p in prompts
        ]

    def collective_rpc(self, method, args=(), kwargs=None):
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def apply_model(self, func):
        return [func(self.model)]

    def reset_prefix_cache(self) -> None:
        self.prefix_resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    """A fake ``vllm`` (and ``vllm.lora.request``) in sys.modules, and a CUDA GPU that "is available"."""
    vllm = ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = FakeSamplingParams
    request = ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS"):  # unset, and restored afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    FakeLLM.instances = []
    return vllm


def test_completions_are_grouped_and_read_like_the_cached_engines(fake_vllm, tiny):
    model, tokenizer = tiny
    examples, prompts = prompts_for(tokenizer)
    engine = VLLMEngine(model, tokenizer)
    params = SamplingParams(n=3, max_new_tokens=5, temperature=0.7, top_p=0.9, min_new_tokens=2)
    batch = engine.generate(examples, prompts, [5, 6, 7, 8], params)
    assert batch.group_ids == [g for g in (5, 6, 7, 8) for _ in range(3)]
    stop = engine.stop_ids[0]
    for row, c in enumerate(batch):
        i, j = divmod(row, 3)
        expected = fake_sample(engine.encode(prompts[i]), j, {"stop_token_ids": [stop], "max_tokens": 5})
        assert c.example is examples[i] and c.prompt_text == prompts[i]
        assert c.prompt_ids == tokenizer(prompts[i], add_special_tokens=False).input_ids
        assert c.completion_ids == expected.token_ids  # sample j of prompt i at row 3i + j, stop id kept
        assert c.text == tokenizer.decode(expected.token_ids, skip_special_tokens=True)
        assert c.logprobs == pytest.approx([-(k + 1) / 10 - j for k in range(len(expected.token_ids))])
        assert c.truncated == (j % 2 == 1)
    (llm,) = FakeLLM.instances
    (call,) = llm.calls
    assert call[0] == [{"prompt_token_ids": engine.encode(p)} for p in prompts]
    assert call[1].kwargs == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 5,
        "min_tokens": 2,
        "logprobs": 0,
        "stop_token_ids": engine.stop_ids,
    }
    assert call[2] is None  # no adapter for a full fine-tune


def test_greedy_sampling_turns_top_p_off(fake_vllm, tiny):
    model, tokenizer = tiny
    examples, prompts = prompts_for(tokenizer, 2)
    engine = VLLMEngine(model, tokenizer)
    engine.generate(
        examples, prompts, [0, 1], SamplingParams(n=1, max_new_tokens=4, temperature=0.0, top_p=0.5)
    )
    kwargs = FakeLLM.instances[0].calls[0][1].kwargs
    assert (kwargs["temperature"], kwargs["top_p"]) == (0.0, 1.0)


def test_vllm_is_built_once_from_the_live_weights_with_the_options(fake_vllm, tiny):
    model, tokenizer = tiny
    examples, prompts = prompts_for(tokenizer, 2)
    options = VLLMConfig(gpu_memory_utilization=0.25, max_model_len=512, enforce_eager=True, kv_cache_gib=1.5)
    engine = VLLMEngine(model, tokenizer, options=options)
    assert FakeLLM.instances == []  # nothing until the first generate
    for _ in range(2):
        engine.generate(examples, prompts, [0, 1], SamplingParams(n=2, max_new_tokens=3))
    (llm,) = FakeLLM.instances
    folder = Path(llm.kwargs.pop("model"))
    assert llm.kwargs == {
        "dtype": "float32",
        "gpu_memory_utilization": 0.25,
        "enforce_eager": True,
        "seed": torch.initial_seed() % 2**31,
        "logprobs_mode": "processed_logprobs",
        "generation_config": "vllm",
        "max_model_len": 512,
        "kv_cache_memory_bytes": 1536 * 2**20,
    }
    saved = load_file(folder / "model.safetensors")
    live = model.state_dict()
    assert set(saved) == set(live) - {"lm_head.weight"}  # the tied head is vLLM's to tie
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    assert '"LlamaForCausalLM"' in (folder / "config.json").read_text()
    assert llm.worker.loads == [] and llm.prefix_resets == 0
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # engine core in this process
    assert os.environ["OMP_NUM_THREADS"] == str(torch.get_num_threads())  # vLLM leaves torch's threads alone


def test_weights_are_pushed_after_an_update_and_only_then(fake_vllm, tiny):
    _, tokenizer = tiny
    model = load_model("tiny-random")  # a copy of its own: it is trained here
    examples, prompts = prompts_for(tokenizer, 2)
    engine = VLLMEngine(model, tokenizer)
    params = SamplingParams(n=2, max_new_tokens=3)
    engine.generate(examples, prompts, [0, 1], params)
    (llm,) = FakeLLM.instances
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step_towards(model, 42)
    assert llm.worker.loads == []
    engine.weights_changed()
    engine.weights_changed()  # two updates between rollouts: one push
    assert llm.worker.loads == []  # pushed lazily, before the next generate
    engine.generate(examples, prompts, [0, 1], params)
    (pushed,) = llm.worker.loads
    live = model.state_dict()
    assert set(pushed) == set(live) - {"lm_head.weight"}
    assert all(torch.equal(pushed[k], live[k]) for k in pushed)
    assert not torch.equal(
        pushed["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"]
    )
    assert llm.prefix_resets == 1  # cached prompt KV from the old weights is dropped
    assert llm.model.lm_head.quant_method.runs == 1  # the tied head is made again from the new embeddings
    engine.generate(examples, prompts, [0, 1], params)
    assert len(llm.worker.loads) == 1 and llm.prefix_resets == 1
    assert FakeLLM.instances == [llm]


def test_sync_weights_pushes_now_and_waits_for_vllm_to_exist(fake_vllm, tiny):
    model, tokenizer = tiny
    examples, prompts = prompts_for(tokenizer, 2)
    engine = VLLMEngine(model, tokenizer)
    engine.sync_weights()  # nothing built yet: the first generate builds vLLM from the live weights
    assert FakeLLM.instances == []
    engine.generate(examples, prompts, [0, 1], SamplingParams(n=1, max_new_tokens=2))
    (llm,) = FakeLLM.instances
    engine.sync_weights()  # an explicit push, without an update reported
    assert len(llm.worker.loads) == 1 and llm.prefix_resets == 1


def test_lora_policy_is_served_as_an_unmerged_adapter_with_a_new_id_per_update(fake_vllm, tiny):
    from peft import LoraConfig, get_peft_model

    _, tokenizer = tiny
    torch.manual_seed(0)
    policy = get_peft_model(
        load_model("tiny-random"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    torch.nn.init.normal_(policy.base_model.model.model.layers[0].mlp.down_proj.lora_B.default.weight)
    base = {k: v.clone() for k, v in policy.get_base_model().state_dict().items() if "lora_" not in k}
    examples, prompts = prompts_for(tokenizer, 2)
    engine = VLLMEngine(policy, tokenizer)
    params = SamplingParams(n=2, max_new_tokens=3)
    engine.generate(examples, prompts, [0, 1], params)
    (llm,) = FakeLLM.instances
    assert (llm.kwargs["enable_lora"], llm.kwargs["max_lora_rank"], llm.kwargs["max_loras"]) == (True, 8, 1)
    saved = load_file(Path(llm.kwargs["model"]) / "model.safetensors")
    assert all("lora_" not in k and "base_layer" not in k for k in saved)
    assert torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.base_layer.weight"],
    )
    first = llm.calls[0][2]
    assert (first.name, first.int_id) == ("policy-1", 1)
    assert (Path(first.path) / "adapter_config.json").exists()

    step_towards(policy, 42)
    engine.weights_changed()
    engine.generate(examples, prompts, [0, 1], params)
    second = llm.calls[1][2]
    assert second.int_id == 2 and second.path != first.path
    assert not Path(first.path).exists()  # the previous adapter's folder is removed
    adapter = load_file(Path(second.path) / "adapter_model.safetensors")
    live = {k: v for k, v in policy.state_dict().items() if "lora_" in k}
    assert len(adapter) == len(live) > 0
    for name, value in adapter.items():
        (match,) = [v for k, v in live.items() if k.replace(".default", "") == name]
        assert torch.equal(value, match)
    assert llm.worker.loads == []  # base weights never pushed: they are frozen
    assert hasattr(policy, "peft_config")  # not merged into the policy
    assert all(torch.equal(v, base[k]) for k, v in policy.get_base_model().state_dict().items() if k in base)
    engine.generate(examples, prompts, [0, 1], params)
    assert llm.calls[2][2] is second


def test_lora_rank_slots():
    assert [lora_rank_slot(r) for r in (1, 2, 8, 9, 16, 300, 512)] == [1, 8, 8, 16, 16, 320, 512]
    with pytest.raises(ConfigError, match="up to 512"):
        lora_rank_slot(513)


def test_missing_vllm_is_refused_with_the_install_command(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails, as where it is not installed
    with pytest.raises(VLLMUnavailable, match=r"pip install 'incentive\[vllm\]'"):
        VLLMEngine(*tiny)
    with pytest.raises(
        ConfigError, match=r"vllm is not installed: on a machine with a CUDA GPU run `pip install"
    ):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["generation.engine=vllm"])


def test_no_cuda_is_refused_at_load_time(fake_vllm, monkeypatch, tiny):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vllm_engine, "packages_distributions", lambda: {"vllm": ["vllm"]})  # a CUDA build
    with pytest.raises(VLLMUnavailable, match="no CUDA GPU is visible"):
        VLLMEngine(*tiny)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["generation.engine=vllm"])


def test_vllm_cpu_build_is_accepted_without_a_gpu(fake_vllm, monkeypatch, tiny):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(
        vllm_engine, "packages_distributions", lambda: {"vllm": ["vllm-cpu"], "yaml": ["PyYAML"]}
    )
    assert cpu_build()
    VLLMEngine(*tiny)
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", ["generation.engine=vllm"])
    assert recipe.generation.engine == "vllm"


def test_recipe_options_reach_the_engine_and_unknown_keys_fail(fake_vllm, tiny):
    recipe = load_recipe(
        ROOT / "recipes" / "demo.yaml",
        [
            "generation.engine=vllm",
            "generation.vllm.gpu_memory_utilization=0.5",
            "generation.vllm.dtype=bfloat16",
        ],
    )
    engine = ENGINES.get(recipe.generation.engine).build(*tiny, 64, recipe.generation)
    assert isinstance(engine, VLLMEngine)
    assert (engine.options.gpu_memory_utilization, engine.options.dtype) == (0.5, "bfloat16")
    with pytest.raises(ConfigError, match="gpu_memory_utilisation"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["generation.vllm.gpu_memory_utilisation=0.5"])
    with pytest.raises(ConfigError, match="less than or equal to 1"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["generation.vllm.gpu_memory_utilization=1.5"])
    assert GenerationConfig().vllm == VLLMConfig()


@REWARDS.register("test-vllm-length")
class Length(Reward):
    """Completion length: varies within every group the fake vLLM returns (3 tokens, or max_new_tokens)."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        return RewardResult([float(c.length) for c in batch])


RL_RECIPE = """
model: {name: tiny-random}
data: {source: task:chain_sum, size: 8, task_args: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}
generation: {engine: vllm, num_generations: 2, prompts_per_step: 2, max_new_tokens: 5, vllm: {enforce_eager: true}}
rewards: [{name: test-vllm-length}]
optim: {lr: 1.0e-3}
rl: {steps: 2}
"""


def test_an_rl_run_builds_vllm_once_and_pushes_each_update_before_the_next_rollout(fake_vllm, tmp_path):
    recipe = tmp_path / "vllm.yaml"
    recipe.write_text(RL_RECIPE)
    Run(load_recipe(recipe), tmp_path / "run").execute()
    (llm,) = FakeLLM.instances
    assert llm.kwargs["enforce_eager"] is True
    assert len(llm.calls) == 2  # one rollout per step
    (pushed,) = llm.worker.loads  # step 1's update, pushed before step 2's rollout
    assert "model.layers.0.self_attn.q_proj.weight" in pushed and llm.prefix_resets == 1


def test_trainer_reports_each_applied_optimizer_step_to_the_engine():
    weight = torch.nn.Parameter(torch.ones(2))
    calls: list[str] = []
    engine = SimpleNamespace(weights_changed=lambda: calls.append("changed"))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    trainer = RLTrainer.__new__(RLTrainer)
    trainer.p = SimpleNamespace(optimizer=optimizer, engine=engine)
    trainer.recipe = SimpleNamespace(optim=SimpleNamespace(max_grad_norm=1.0))
    weight.grad = torch.ones(2)
    trainer._optimizer_step()
    assert calls == ["changed"]
    weight.grad = torch.tensor([float("inf"), 1.0])  # a skipped, non-finite update changes nothing
    trainer._optimizer_step()
    assert calls == ["changed"]


# -- the real thing: vLLM installed, on a CUDA GPU or as vLLM's CPU build -----------------------------------------

HAS_VLLM = importlib.util.find_spec("vllm") is not None and (torch.cuda.is_available() or cpu_build())
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM,
    reason="needs vllm with a CUDA GPU (pip install 'incentive[vllm]' on a GPU machine) or vLLM's CPU build",
)
REAL_OPTIONS = VLLMConfig(max_model_len=1024, enforce_eager=True, kv_cache_gib=1)
"""A KV cache of a set size: the CPU build's share of memory would count the earlier tests' instances too."""


def tiny_policy():
    """The check script's tiny random model, with attention heads that vLLM's CPU build takes too."""
    return from_check_script("tiny_policy")()


def greedy(engine, examples, prompts, tokens=24):
    """Greedy completions' token ids, one per prompt."""
    params = SamplingParams(n=1, max_new_tokens=tokens, temperature=0.0)
    return [c.completion_ids for c in engine.generate(examples, prompts, list(range(len(prompts))), params)]


def hf_logprobs(model, prompt_ids, completion_ids, temperature):
    """Teacher-forced logprobs of a completion at ``temperature`` with the HF model."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1)


@needs_vllm
def test_real_vllm_matches_hf_before_and_after_an_update():
    tokenizer = load_tokenizer("tiny-random")
    model = tiny_policy()
    examples, prompts = prompts_for(tokenizer)
    hf = ENGINES.get("hf")(model, tokenizer)
    engine = VLLMEngine(model, tokenizer, options=REAL_OPTIONS)
    threads = torch.get_num_threads()
    assert greedy(engine, examples, prompts) == greedy(hf, examples, prompts)
    assert torch.get_num_threads() == threads  # the policy trains in this process too
    sampled = engine.generate(
        examples, prompts, [0, 1, 2, 3], SamplingParams(n=2, max_new_tokens=16, temperature=0.7)
    )
    for c in sampled:
        expected = hf_logprobs(model, c.prompt_ids, c.completion_ids, 0.7)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=2e-3)
    before = greedy(hf, examples, prompts)
    step_towards(model, 42, steps=3)
    engine.weights_changed()
    after = greedy(hf, examples, prompts)
    assert after != before  # the update shows in greedy output
    assert greedy(engine, examples, prompts) == after


@needs_vllm
def test_real_vllm_matches_hf_on_the_embedded_model():
    model, tokenizer = load_model("embedded"), load_tokenizer("embedded")
    examples, prompts = prompts_for(tokenizer, 3)
    hf = ENGINES.get("hf")(model, tokenizer)
    engine = VLLMEngine(model, tokenizer, options=REAL_OPTIONS)
    assert greedy(engine, examples, prompts, 40) == greedy(hf, examples, prompts, 40)


@needs_vllm
def test_real_vllm_serves_a_lora_policy_before_and_after_an_update():
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer("tiny-random")
    torch.manual_seed(0)
    policy = get_peft_model(
        tiny_policy(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"])
    )
    examples, prompts = prompts_for(tokenizer)
    hf = ENGINES.get("hf")(policy, tokenizer)
    engine = VLLMEngine(policy, tokenizer, options=REAL_OPTIONS)
    before = greedy(hf, examples, prompts)
    assert greedy(engine, examples, prompts) == before
    step_towards(policy, 42, lr=5.0, steps=3)
    engine.weights_changed()
    after = greedy(hf, examples, prompts)
    assert after != before  # the update shows in greedy output
    assert greedy(engine, examples, prompts) == after
