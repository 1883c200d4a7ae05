"""Typed run configuration. Unknown keys are errors; YAML recipes plus ``--set a.b=c`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from incentive.data.config import DataConfig
from incentive.training.sinks import BACKENDS, check_installed


class Strict(BaseModel):
    """Base for config sections: unknown keys fail, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Strict):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelConfig(Strict):
    name: str = "embedded"
    lora: LoraConfig | None = None
    onednn: bool | None = Field(
        None,
        description="CPU fp32: linear layers through oneDNN; null (default): on for AMD CPUs, where it is about "
        "2x MKL's speed, off for Intel's, where MKL is faster",
    )


class TemplateConfig(Strict):
    name: str = "think-answer"
    think_tag: str | None = Field(
        None, description="default: the template's own tag (think, plan, code, ...)"
    )
    answer_tag: str = "answer"
    system: str | None = None
    chat_template: bool = True


class VLLMConfig(Strict):
    """How the vLLM engine (``generation.engine: vllm``: CUDA machines, or vLLM's CPU build) sizes its instance."""

    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="share of GPU memory vLLM takes for its weights and KV cache (of CPU memory, with vLLM's CPU build)",
    )
    dtype: Literal["policy", "float32", "bfloat16", "float16"] = Field(
        "policy", description="policy: the dtype the policy was loaded in"
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV cache size in GiB, in place of sizing it by gpu_memory_utilization (vLLM's "
        "kv_cache_memory_bytes); with vLLM's CPU build, whose share counts this process's own memory, set it",
    )
    max_model_len: int | None = Field(None, ge=16, description="default: the model's context length")
    enforce_eager: bool = Field(False, description="no CUDA graphs: faster start, slower decoding")


class GenerationConfig(Strict):
    engine: Literal["cached", "hf", "vllm"] = Field(
        "cached",
        description="cached: own decode loop sharing each prompt's KV cache; hf: transformers generate; "
        "vllm: vLLM on a CUDA GPU (or vLLM's CPU build), weights synced after each update (pip install 'incentive[vllm]')",
    )
    num_generations: int = Field(4, ge=1, description="G: completions per prompt")
    prompts_per_step: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    sampling_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="cached engine: bfloat16 samples from a bf16 copy of the policy, reloaded after each update: "
        "decoding ~1.5x faster on CPUs with AMX (refused on others), from rounded weights (training still "
        "scores in fp32)",
    )
    vllm: VLLMConfig = VLLMConfig()

    @model_validator(mode="after")
    def _engine_usable(self) -> GenerationConfig:
        """Refuse, at load time and before any model is loaded, an engine or sampling dtype that cannot run."""
        if self.engine == "vllm":
            from incentive.engines.vllm import require_vllm

            require_vllm()
        if self.sampling_dtype == "bfloat16":
            if self.engine != "cached":
                raise ValueError(
                    "generation.sampling_dtype: bfloat16 is for the cached engine "
                    "(vLLM has its own: generation.vllm.dtype)"
                )
            from incentive.engines.low_precision import require_bf16_units

            require_bf16_units()
        return self


class RewardConfig(Strict):
    name: str
    weight: float = 1.0
    args: dict[str, Any] = {}


class AdvantageConfig(Strict):
    name: str = "grpo"
    args: dict[str, Any] = {}


class LossConfig(Strict):
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_beta: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_reference: Literal["initial", "proxy"] = "initial"
    aggregation: Literal["token-mean", "seq-mean-token-mean", "constant"] = "token-mean"
    constant_normaliser: float | None = Field(None, gt=0, description="default: generation.max_new_tokens")


class OptimConfig(Strict):
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"


class DynamicSamplingConfig(Strict):
    """DAPO dynamic sampling: drop groups whose rewards do not vary, refill them with fresh prompts."""

    enabled: bool = False
    max_rounds: int = Field(3, ge=0, description="extra generation rounds per step to refill dropped groups")


class HookConfig(Strict):
    name: str
    args: dict[str, Any] = {}


class RLConfig(Strict):
    steps: int = Field(0, ge=0)
    num_iterations: int = Field(1, ge=1, description="optimisation passes over each rollout batch")
    micro_batch_tokens: int = Field(2048, ge=16, description="token budget of one forward/backward chunk")
    time_budget_s: float | None = Field(
        None, gt=0, description="stop RL once rollout+reward+update time reaches this (evals not counted)"
    )
    skip_zero_advantage: bool = True
    max_failed_share: float = Field(0.5, ge=0, le=1)
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    mask_truncated: bool = Field(False, description="leave completions cut at max_new_tokens out of the loss")


class SFTConfig(Strict):
    steps: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    data: DataConfig | None = None


class ProxyConfig(Strict):
    """NOVER's proxy: a lagging EMA copy of the policy (``sync_every: 0`` keeps it frozen)."""

    enabled: bool = False
    sync_every: int = Field(0, ge=0)
    alpha: float = Field(0.9, ge=0, le=1)
    lora_sync: Literal["factors", "exact"] = "exact"


class EvalConfig(Strict):
    data: DataConfig | None = None
    every: int = Field(0, ge=0, description="evaluate during RL every N steps (0: only at stage ends)")
    samples: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    max_new_tokens: int | None = None
    batch_size: int = Field(32, ge=1)


class ToolConfig(Strict):
    """A tool the policy may call during rollouts (see incentive.tools), with its constructor arguments."""

    name: str
    args: dict[str, Any] = {}


class ToolsConfig(Strict):
    """Multi-turn rollouts: a ``</tool_call>`` ends a turn, the tool runs, its output (masked from the loss)
    joins the context and generation goes on; ``generation.max_new_tokens`` bounds what the policy writes."""

    tools: list[ToolConfig] = Field(min_length=1)
    max_calls: int = Field(4, ge=1, description="calls that execute; one more ends the episode")
    max_observation_tokens: int = Field(256, ge=1, description="a longer tool output is cut")
    call_tag: str = "tool_call"
    response_tag: str = "tool_response"


class RunConfig(Strict):
    output_dir: str = "runs"
    name: str | None = None
    seed: int = 0
    threads: int | None = None
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end of each stage")
    keep_last: int = Field(2, ge=1)


class LoggingConfig(Strict):
    """Live logging besides metrics.jsonl; each backend is optional, and one turned on must be installed."""

    tensorboard: bool = Field(False, description="event files in RUN_DIR/tensorboard")
    trackio: bool = Field(False, description="a local trackio run (`trackio show` opens the dashboard)")
    wandb: bool = Field(False, description="an offline Weights & Biases run in RUN_DIR/wandb")
    project: str = Field("incentive", description="trackio / W&B project; the run is named after its folder")

    @model_validator(mode="after")
    def _installed(self) -> LoggingConfig:
        check_installed([switch for switch in BACKENDS if getattr(self, switch)])
        return self


class Recipe(Strict):
    """A whole run. ``description`` is what ``incentive recipes`` prints."""

    description: str = ""
    model: ModelConfig = ModelConfig()
    data: DataConfig
    template: TemplateConfig = TemplateConfig()
    generation: GenerationConfig = GenerationConfig()
    tools: ToolsConfig | None = None
    rewards: list[RewardConfig] = [RewardConfig(name="format"), RewardConfig(name="verifier")]
    advantage: AdvantageConfig = AdvantageConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    rl: RLConfig = RLConfig()
    sft: SFTConfig = SFTConfig()
    proxy: ProxyConfig = ProxyConfig()
    hooks: list[HookConfig] = []
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.loss.kl_reference == "proxy" and not self.proxy.enabled:
            raise ValueError("loss.kl_reference is 'proxy' but proxy.enabled is false")
        return self


class ConfigError(ValueError):
    """A recipe that cannot be used, with the file and the offending keys."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` → (["a", "b"], c) with c parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply overrides, validate everything (before any model is loaded)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    for text in overrides or []:
        apply_override(tree, *parse_override(text))
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{path}: invalid recipe\n{err}") from err
