"""Typed run configuration. Unknown keys are errors; YAML recipes plus ``--set a.b=c`` overrides."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from incentive.data.config import DataConfig, follow_source_overrides, recipe_sources
from incentive.data.preferences import Objective, PreferenceDataConfig
from incentive.plugins import import_plugin
from incentive.registry import UnknownName, did_you_mean
from incentive.training.sinks import BACKENDS, check_installed


class Strict(BaseModel):
    """Base for config sections: unknown keys fail, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def registered(module: str, registry: str, name: str) -> str:
    """``name`` if ``module``'s registry has it, so a typo fails at load time with a did-you-mean. The module
    is imported here, not above: importing it registers its built-in parts, and some of those import this one."""
    try:
        getattr(import_module(module), registry).get(name)
    except UnknownName as err:
        raise ValueError(str(err)) from err
    return name


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
    activation_checkpointing: bool = Field(
        False,
        description="training passes keep only each decoder layer's input and run the layer again in the "
        "backward pass: same gradients, a fraction of the activation memory, about a third more update time "
        "(for long completions; Llama, Mistral and Qwen2 models)",
    )
    update_products: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="bfloat16: the RL update's linear products (layers and LM head, forward and backward) take "
        "bf16 inputs and round their output to bf16, as torch.autocast and TRL's bf16=True do; weights, "
        "gradients, Adam state, norms, attention and the softmax stay fp32, and sampling is unchanged. About "
        "twice the products' fp32 rate on CPUs with avx512_bf16 or AMX (refused on others); linear layers then "
        "go through oneDNN (model.onednn may not be false)",
    )
    backend: str = Field(
        "fused",
        description="where training and scoring get their logprobs: fused (shared prompts, packed passes, the "
        "engine's prefill, fused LM head, vocabulary gradients straight into .grad) or reference (the model's "
        "plain forward and backward over whole rows, every gradient through autograd; slower, and no "
        "activation checkpointing); see docs/performance.md",
    )

    @field_validator("backend")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.logprob_backends", "LOGPROB_BACKENDS", name)

    @model_validator(mode="after")
    def _bf16_products_usable(self) -> ModelConfig:
        """Refuse, before any model is loaded, bf16 update products that could not run or would be slow."""
        if self.update_products == "bfloat16":
            if self.onednn is False:
                raise ValueError(
                    "model.update_products: bfloat16 runs its products through oneDNN; leave model.onednn unset"
                )
            from incentive.models.bf16_products import require_bf16_products

            require_bf16_products()
        return self


class TemplateConfig(Strict):
    name: str = "think-answer"
    think_tag: str | None = Field(
        None, description="default: the template's own tag (think, plan, code, ...)"
    )
    answer_tag: str = "answer"
    system: str | None = None
    chat_template: bool = True

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.templates", "TEMPLATES", name)


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
    engine: str = Field(
        "cached",
        description="cached: own decode loop sharing each prompt's KV cache; hf: transformers generate; "
        "vllm: vLLM on a CUDA GPU (or vLLM's CPU build), weights synced after each update (pip install 'incentive[vllm]'); "
        "or an engine a plugin registers (incentive.engines.ENGINES)",
    )
    num_generations: int = Field(4, ge=1, description="G: completions per prompt")
    prompts_per_step: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    min_new_tokens: int = Field(
        0,
        ge=0,
        description="no end token is sampled before this many new tokens (to force long completions, e.g. in "
        "benchmarks); logprobs stay those of the model's own distribution",
    )
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    sampling_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="cached engine: bfloat16 samples from a bf16 copy of the policy, reloaded after each update: "
        "decoding ~1.5x faster on CPUs with AMX (refused on others), from rounded weights (training still "
        "scores in fp32)",
    )
    vllm: VLLMConfig = VLLMConfig()

    @field_validator("engine")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.engines", "ENGINES", name)

    @model_validator(mode="after")
    def _lengths_consistent(self) -> GenerationConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"generation.min_new_tokens ({self.min_new_tokens}) is above max_new_tokens ({self.max_new_tokens})"
            )
        return self

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
    id: str | None = Field(
        None,
        description="the part's key in metrics and logs (reward/ID/mean); default: its name. Distinct ids let "
        "one reward be listed twice, e.g. with different args",
    )
    weight: float = 1.0
    args: dict[str, Any] = {}
    timeout_s: float = Field(600.0, gt=0, description="a call that takes longer fails its samples: timeout")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.rewards", "REWARDS", name)

    @field_validator("id")
    @classmethod
    def _plain(cls, value: str | None) -> str | None:
        """An id names metric keys split on '/' (reward/ID/mean), so it is a plain word."""
        if value is not None and not re.fullmatch(r"[\w.-]+", value):
            raise ValueError(f"'{value}': use letters, digits, '_', '-' and '.' (it names metrics: reward/ID/mean)")
        return value

    @property
    def key(self) -> str:
        """What the part's scores are logged under: its id, else its name."""
        return self.id or self.name


class AdvantageConfig(Strict):
    name: str = "grpo"
    args: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.advantages", "ADVANTAGES", name)


class LossConfig(Strict):
    """The policy loss by name (incentive.losses.POLICY_LOSSES) with its own keys, the KL and the aggregation."""

    name: str = Field("clipped", description="clipped, dual_clip, gspo or cispo (see docs/losses.md)")
    eps_low: float = Field(0.2, description="clipped, dual_clip: ratio clipped below at 1 - eps_low")
    eps_high: float = Field(0.28, description="clipped, dual_clip: ratio clipped above at 1 + eps_high")
    clip_ratio_c: float = Field(
        3.0, gt=1, description="dual_clip: where A < 0, the loss is at most -clip_ratio_c·A"
    )
    gspo_eps_low: float = Field(3e-4, ge=0, description="gspo: sequence ratio clipped below at 1 - gspo_eps_low")
    gspo_eps_high: float = Field(4e-4, ge=0, description="gspo: sequence ratio clipped above at 1 + gspo_eps_high")
    cispo_eps_low: float = Field(
        1.0, ge=0, le=1, description="cispo: IS weight floor 1 - cispo_eps_low (1: no floor, as MiniMax-M1)"
    )
    cispo_eps_high: float = Field(3.0, ge=0, description="cispo: IS weight cap 1 + cispo_eps_high")
    kl_beta: float = Field(0.0, ge=0)
    kl_estimator: str = Field("k3", description="k1, k2 or k3 (incentive.losses.KL_ESTIMATORS)")
    kl_in_reward: bool = Field(
        False,
        description="subtract kl_beta·KL(old policy, reference) per token from the advantage (PPO-RLHF's per-token "
        "KL reward) instead of adding kl_beta·KL as a loss term",
    )
    kl_reference: Literal["initial", "proxy"] = "initial"
    aggregation: str = Field(
        "token-mean", description="token-mean, seq-mean-token-mean or constant (incentive.losses.AGGREGATIONS)"
    )
    constant_normaliser: float | None = Field(None, gt=0, description="default: generation.max_new_tokens")

    @field_validator("name")
    @classmethod
    def _registered_loss(cls, name: str) -> str:
        return registered("incentive.losses", "POLICY_LOSSES", name)

    @field_validator("kl_estimator")
    @classmethod
    def _registered_estimator(cls, name: str) -> str:
        return registered("incentive.losses", "KL_ESTIMATORS", name)

    @field_validator("aggregation")
    @classmethod
    def _registered_aggregation(cls, name: str) -> str:
        return registered("incentive.losses", "AGGREGATIONS", name)

    @model_validator(mode="after")
    def _keys_of_the_loss(self) -> LossConfig:
        """Refuse a key only another loss reads, set away from its default (it would do nothing); a resolved
        config, which lists the unread keys at their defaults, still loads. The default loss's keys (eps_low, eps_high)
        pass with any loss: recipes carry them, and ``--set loss.name=...`` should still work."""
        from incentive.losses import POLICY_LOSSES, own_keys

        fields = type(self).model_fields
        reads = set(own_keys(POLICY_LOSSES.get(self.name)))
        always = set(own_keys(POLICY_LOSSES.get(fields["name"].default)))
        changed = {key for key in self.model_fields_set if getattr(self, key) != fields[key].default}
        for key in sorted(changed - reads - always):
            users = [n for n in POLICY_LOSSES.names() if key in own_keys(POLICY_LOSSES.get(n))]
            if users:
                raise ValueError(f"{key} is read by {', '.join(users)}, not by loss '{self.name}'")
        return self


class CriticConfig(Strict):
    """PPO's value model, for estimators that read values (advantage ``gae``): V(s_t) before each completion
    token, a scalar head on a last hidden state. It has its own AdamW (optim's betas and weight decay, its own
    lr) and schedule (optim's warmup and shape), trains on the clipped value loss, and is saved in checkpoints;
    see docs/ppo.md."""

    model: Literal["policy_head", "separate"] = Field(
        "policy_head",
        description="policy_head: a linear head on the policy's last hidden state (detached: the value loss "
        "trains the head only, and costs one gradient-free forward pass); separate: a model of its own, "
        "backbone and head trained together",
    )
    name: str | None = Field(
        None, description="separate: the backbone (any model.name) with its own weights; default: model.name"
    )
    lora: LoraConfig | None = Field(
        None, description="separate: LoRA adapters on the backbone (and the head) train"
    )
    lr: float | None = Field(
        None, gt=0, description="default: 1e-3 for policy_head (a linear probe), 1e-5 for separate"
    )
    value_clip: float | None = Field(
        0.2, gt=0, description="the loss clips V to V_old ± value_clip (PPO); null: plain ½(V − R)²"
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="the critic's own gradient clipping")

    @model_validator(mode="after")
    def _separate_keys(self) -> CriticConfig:
        if self.model == "policy_head":
            for key in ("name", "lora"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is for model: separate; a policy_head is a head on the policy")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr or (1e-3 if self.model == "policy_head" else 1e-5)


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

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.hooks", "HOOKS", name)


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
    grad_accum: int = Field(1, ge=1, description="batches of batch_size accumulated into one optimizer step")
    lr: float = Field(5e-5, gt=0)
    data: DataConfig | None = None
    without_solutions: Literal["error", "skip"] = Field(
        "error",
        description="data with no worked solutions to imitate (no 'reasoning' column, no task with a solution "
        "writer): refuse the run, or skip SFT saying so (set for a recipe's SFT when --set data.source replaces "
        "its data)",
    )


class RewardModelConfig(Strict):
    """A sequence-classification reward model, trained before any SFT or RL when ``steps`` > 0 and saved as a
    Hugging Face folder in RUN_DIR/reward_model, which the ``reward_model`` reward part scores with."""

    steps: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1, description="pairs (bradley_terry) or rows (regression) per step")
    lr: float = Field(1e-5, gt=0)
    objective: Objective = Field(
        "bradley_terry",
        description="bradley_terry: -log sigmoid(r_chosen - r_rejected) on {prompt, chosen, rejected} rows; "
        "regression: squared error to the label of {prompt, completion, label} rows",
    )
    data: PreferenceDataConfig | None = None
    eval_share: float = Field(
        0.1, ge=0, lt=1, description="share of the rows held out for the eval loss and pairwise accuracy"
    )
    eval_every: int = Field(0, ge=0, description="held-out eval every N steps (0: only after the last)")
    backbone: str | None = Field(
        None, description="the model the classifier is built on (any model.name); default: model.name"
    )
    lora: LoraConfig | None = None

    @model_validator(mode="after")
    def _has_data(self) -> RewardModelConfig:
        if self.steps and self.data is None:
            raise ValueError(
                f"steps is {self.steps} but no data is given: a file of {{prompt, chosen, rejected}} rows "
                "(bradley_terry) or {prompt, completion, label} rows (regression) as reward_model.data.source"
            )
        return self


class ProxyConfig(Strict):
    """NOVER's proxy: a lagging EMA copy of the policy (``sync_every: 0`` keeps it frozen)."""

    enabled: bool = False
    sync_every: int = Field(0, ge=0)
    alpha: float = Field(0.9, ge=0, le=1)
    lora_sync: Literal["factors", "exact"] = "exact"


class EvalConfig(Strict):
    data: DataConfig | None = None
    verifier: str = Field(
        "rule",
        description="judge of the held-out evals: rule, accepted_wordings (an example's accepted wordings), "
        "tinyv or general_reasoner (judge model: embedded)",
    )
    every: int = Field(0, ge=0, description="evaluate during RL every N steps (0: only at stage ends)")
    stages: list[Literal["base", "sft", "rl"]] = Field(
        ["base", "sft", "rl"],
        description="which stage ends are evaluated (base: the model as loaded; drop it when it was evaluated "
        "already, e.g. an SFT checkpoint another run scored)",
    )
    samples: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    max_new_tokens: int | None = None
    batch_size: int = Field(32, ge=1)

    @field_validator("verifier")
    @classmethod
    def _known_verifier(cls, name: str) -> str:
        from incentive.evaluation import VERIFIERS  # heavy (models, engines): only when a recipe names one

        if name not in VERIFIERS:
            raise ValueError(f"unknown verifier '{name}'; {did_you_mean(name, VERIFIERS)}")
        return name


class ToolConfig(Strict):
    """A tool the policy may call during rollouts (see incentive.tools), with its constructor arguments."""

    name: str
    args: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.tools", "TOOLS", name)


class ToolsConfig(Strict):
    """Multi-turn rollouts: a ``</tool_call>`` ends a turn, the tool runs, its output (masked from the loss)
    joins the context and generation goes on; ``generation.max_new_tokens`` bounds what the policy writes. The
    section is the built-in ``tools`` environment's (docs/rollouts.md)."""

    tools: list[ToolConfig] = Field(min_length=1)
    max_calls: int = Field(4, ge=1, description="calls that execute; one more ends the episode")
    max_observation_tokens: int = Field(256, ge=1, description="a longer tool output is cut")
    call_tag: str = "tool_call"
    response_tag: str = "tool_response"


class RolloutConfig(Strict):
    """How each example's group is sampled: a strategy from incentive.rollout.ROLLOUT_STRATEGIES (see
    docs/rollouts.md) with its constructor arguments."""

    name: str = Field(
        "plain",
        description="plain: G samples of the template's prompt; prefixes: the group split among forced assistant "
        "prefixes (modes) by share, each labelled; or a strategy a plugin registers",
    )
    args: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.rollout", "ROLLOUT_STRATEGIES", name)


class EnvironmentConfig(Strict):
    """Multi-turn episodes on an environment from incentive.rollout.ENVIRONMENTS (see docs/rollouts.md): its
    observations join the context, masked from the loss; ``generation.max_new_tokens`` bounds what the policy
    writes per episode."""

    name: str
    args: dict[str, Any] = {}
    max_turns: int | None = Field(None, ge=1, description="policy turns per episode at most (default: no limit)")
    max_turn_tokens: int | None = Field(
        None, ge=1, description="tokens per policy turn at most; the environment sees the cut turn (default: none)"
    )
    max_context_tokens: int | None = Field(
        None, ge=16, description="an observation that would take the sequence this long ends the episode instead "
        "(default: the model's context length)"
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered("incentive.rollout", "ENVIRONMENTS", name)


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


def _imported(entry: str, info: ValidationInfo) -> str:
    """Import a plugin the recipe names; a path is relative to the validation context's ``recipe_dir`` (the recipe
    file's folder, as :func:`load_recipe` passes it), else to the current folder."""
    base = (info.context or {}).get("recipe_dir") or Path.cwd()
    return import_plugin(entry, Path(base))


class Plugins(Strict):
    """The recipe's plugins; :func:`load_recipe` checks them alone first, so a failed import is the one error."""

    imports: list[Annotated[str, AfterValidator(_imported)]] = Field(
        default_factory=list,
        description="modules that register parts (rewards, estimators, losses, KL estimators, aggregations, logprob "
        "backends, hooks, templates, engines, tools, rollout strategies, environments, tasks) with the package's "
        "decorators: .py files (relative to the recipe's folder) or dotted module names",
    )


class Recipe(Plugins):
    """A whole run. ``description`` is what ``incentive recipes`` prints. Pydantic validates fields in the order
    they are defined, and ``imports`` (from :class:`Plugins`) comes first: the plugins register their parts before
    any name in the recipe is checked."""

    description: str = ""
    model: ModelConfig = ModelConfig()
    data: DataConfig
    template: TemplateConfig = TemplateConfig()
    generation: GenerationConfig = GenerationConfig()
    tools: ToolsConfig | None = None
    rollout: RolloutConfig = RolloutConfig()
    environment: EnvironmentConfig | None = None
    rewards: list[RewardConfig] = Field(
        default_factory=lambda: [RewardConfig(name="format"), RewardConfig(name="verifier")]
    )
    advantage: AdvantageConfig = AdvantageConfig()
    loss: LossConfig = LossConfig()
    critic: CriticConfig | None = None
    optim: OptimConfig = OptimConfig()
    rl: RLConfig = RLConfig()
    sft: SFTConfig = SFTConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    proxy: ProxyConfig = ProxyConfig()
    hooks: list[HookConfig] = []
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.loss.kl_reference == "proxy" and not self.proxy.enabled:
            raise ValueError("loss.kl_reference is 'proxy' but proxy.enabled is false")
        if self.tools is not None and self.environment is not None:
            raise ValueError(
                "tools and environment are both set; tools is the tool environment's section, so set one of them"
            )
        return self


class ConfigError(ValueError):
    """A recipe that cannot be used, with the file and the offending keys."""


Loc = tuple[str | int, ...]
"""Where in a config a pydantic error points: keys and list indices."""
ModelT = TypeVar("ModelT", bound=BaseModel)


def load_yaml(text: str, source: str) -> Any:
    """``text`` parsed as YAML, or a one-line ConfigError naming ``source`` (pyyaml's report spans lines)."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML: {err.problem or err.context}{where}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from err


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` → (["a", "b"], c) with c parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: not of the form key.path=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text}: '{key}' is not a key path like rl.steps")
    return path, load_yaml(raw, f"--set {text}") if raw.strip() else ""


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe file's mapping of sections; a missing, unreadable or malformed file is a one-line error."""
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a folder, not a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line}); "
            "save the recipe as UTF-8"
        ) from err
    except OSError as err:
        raise ConfigError(f"recipe {path} cannot be read: {err.strerror or err}") from err
    tree = load_yaml(text, str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    return tree


class RecipeTree:
    """A recipe file read as a tree, with ``--set`` overrides applied on it; it remembers which override set
    what, so that a validation error names where its value came from (the file, or the ``--set``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tree = read_recipe(self.path)
        self.applied: list[tuple[list[str], str]] = []

    def override(self, overrides: Sequence[str]) -> None:
        """Apply ``key.path=value`` overrides in order."""
        for text in overrides:
            keys, value = parse_override(text)
            apply_override(self.tree, keys, value)
            self.applied.append((keys, text))

    def origin(self, loc: Loc) -> str:
        """The last --set that replaced ``loc`` or a section above it, else the file and any --set below."""
        at = [str(part) for part in loc]
        setting = [text for keys, text in self.applied if at[: len(keys)] == keys]
        if setting:
            return f"--set {setting[-1]}"
        below = [f"--set {text}" for keys, text in self.applied if keys[: len(at)] == at]
        return " and ".join([str(self.path), *below])

    def validate(self, model: type[ModelT], context: dict[str, Any] | None = None) -> ModelT:
        """The tree as ``model``; a problem is one ConfigError line."""
        try:
            return model.model_validate(self.tree, context=context)
        except ValidationError as err:
            raise ConfigError(explain(err, model, self.origin)) from err


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply overrides, import its plugins, validate everything (before any model is loaded).
    Plugin paths are relative to the recipe's folder, or to the current folder where ``--set imports=...`` gave
    them."""
    recipe = RecipeTree(path)
    sources = recipe_sources(recipe.tree)
    recipe.override(overrides or [])
    set_keys = [keys for keys, _ in recipe.applied]
    for note in follow_source_overrides(recipe.tree, sources, set_keys):
        print(f"[incentive] {note}")
    from_set = any(keys[0] == "imports" for keys in set_keys)
    context = {"recipe_dir": Path.cwd() if from_set else recipe.path.resolve().parent}
    if "imports" in recipe.tree:
        try:
            Plugins.model_validate({"imports": recipe.tree["imports"]}, context=context)
        except ValidationError as err:
            raise ConfigError(explain(err, Recipe, recipe.origin)) from err
    return recipe.validate(Recipe, context)


def dotted(loc: Loc) -> str:
    """``("rewards", 0, "name")`` → ``rewards[0].name``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def explain(
    err: ValidationError,
    model: type[BaseModel],
    origin: Callable[[Loc], str] | None = None,
    key: Callable[[Loc], str] = dotted,
) -> str:
    """Pydantic's report (several lines per problem, with links) as one line: per problem where it came from,
    the key and value, what was expected, and a did-you-mean for a near-miss key or name."""
    problems = [_problem(e, model, origin, key) for e in err.errors(include_url=False)]
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + " | ".join(problems)


def _problem(
    error: Any, model: type[BaseModel], origin: Callable[[Loc], str] | None, key: Callable[[Loc], str]
) -> str:
    """One problem of a pydantic error as ``origin: key = value: what is wrong``."""
    loc: Loc = tuple(error["loc"])
    kind, value = error["type"], error["input"]
    if kind == "extra_forbidden":
        what = f"unknown key; {did_you_mean(str(loc[-1]), _fields_at(model, loc), 'valid keys', None)}"
    elif kind == "missing":
        what = "missing; it is required"
    elif kind in ("value_error", "assertion_error"):
        what = error["msg"].split(", ", 1)[-1]  # drop pydantic's "Value error, "
    else:
        what = error["msg"].replace("Input should be", "should be", 1)
        if kind == "literal_error" and isinstance(value, str):
            options = re.findall(r"'([^']*)'", error["ctx"]["expected"])
            hint = did_you_mean(value, options)
            what += f"; {hint}" if hint.startswith("did") else ""
    name = key(loc)
    shown = kind not in ("extra_forbidden", "missing") and not isinstance(value, dict)
    if shown and name and not (isinstance(value, str) and f"'{value}'" in what):
        text = repr(value)
        name += f" = {text if len(text) <= 60 else text[:57] + '...'}"
    return ": ".join(part for part in (origin(loc) if origin else "", name, what) if part)


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys valid beside ``loc``'s last one: the fields of the section it sits in."""
    section: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = section.model_fields.get(part) if section else None
        section = _section_in(field.annotation) if field else None
    return list(section.model_fields) if section else []


def _section_in(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds, through ``X | None`` and ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((s for s in map(_section_in, get_args(annotation)) if s is not None), None)
