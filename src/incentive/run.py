"""A run: validate the recipe, then reward model → base eval → SFT → eval → RL → eval, with checkpoints and
resume."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from transformers import PreTrainedModel

from incentive.advantages import ADVANTAGES
from incentive.config import ConfigError, Recipe, TemplateConfig
from incentive.data import (
    DataConfig,
    Example,
    MissingSolutions,
    fit_to_context,
    keep_usable,
    load_examples,
    sft_pairs,
)
from incentive.data.preferences import load_preferences
from incentive.engines import ENGINES, Engine
from incentive.engines.environment import EnvironmentEngine
from incentive.evaluation import build_verifier
from incentive.hooks import HOOKS
from incentive.hooks.builtin import HeldOutEval, ProxySync
from incentive.logprob_backends import logprob_backend
from incentive.losses import build_policy_loss
from incentive.malloc import keep_freed_memory
from incentive.models import context_length, load_tokenizer
from incentive.registry import Registry
from incentive.rewards import REWARDS  # noqa: F401  (registers the built-in rewards)
from incentive.rewards.pipeline import RewardPipeline
from incentive.rollout import ENVIRONMENTS, ROLLOUT_STRATEGIES, Environment, RolloutStrategy
from incentive.scorer import ModelScorer
from incentive.templates import TEMPLATES, Template
from incentive.training.checkpoint import Checkpoints, seed_everything
from incentive.training.critic import Critic, build_critic
from incentive.training.held_out import HeldOutEvals
from incentive.training.metrics import MetricsLog
from incentive.training.optim import build_optimizer, build_scheduler
from incentive.training.policy import build_policy, load_policy_weights, trainable_parameters
from incentive.training.reference import initial_reference, model_view
from incentive.training.reward_model import (
    Encoded,
    RewardModelTrainer,
    build_reward_model,
    encode_rows,
    save_reward_model,
    split_held_out,
)
from incentive.training.rl import RLParts, RLTrainer
from incentive.training.run_lock import LOCK_NAME, RunFolderBusy, RunLock
from incentive.training.sampler import EpochSampler
from incentive.training.sft import ObservationMaskingEncoder, SFTTrainer
from incentive.training.sinks import build_sinks
from incentive.training.stage import StageLoop

STAGES = ("reward_model", "sft", "rl")


class RunError(RuntimeError):
    """A run that cannot start or continue, with what to do about it."""


def build_template(cfg: TemplateConfig) -> Template:
    """The recipe's template with the tag format its class declares."""
    cls = TEMPLATES.get(cfg.name)
    tags = cls.tag_format(cfg.think_tag or cls.think_tag, cfg.answer_tag)
    return cls(tags, system=cfg.system, use_chat_template=cfg.chat_template)


class Run:
    """Owns the run folder: resolved config, metrics.jsonl, evals, checkpoints."""

    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool = False, overwrite: bool = False) -> None:
        self.recipe = recipe
        self.dir = run_dir
        self.resume = resume
        if recipe.rl.steps == 0 and recipe.sft.steps == 0 and recipe.reward_model.steps == 0:
            raise ConfigError("nothing to train: rl.steps, sft.steps and reward_model.steps are all 0")
        # Everything that can be checked without a model is checked now, before minutes of loading.
        self.rewards = RewardPipeline(recipe.rewards)
        self.estimator = _build(ADVANTAGES, "advantage", recipe.advantage.name, recipe.advantage.args)
        group = recipe.generation.num_generations
        if recipe.rl.steps and group < self.estimator.min_group_size:
            raise ConfigError(
                f"generation.num_generations is {group}, but advantage '{recipe.advantage.name}' needs at least "
                f"{self.estimator.min_group_size} completions per prompt (it compares each with the others of its "
                "group; with fewer every advantage is 0 and RL never updates the policy)"
            )
        if recipe.rl.steps:
            self._check_critic()
        self.hooks = [_build(HOOKS, "hook", h.name, h.args) for h in recipe.hooks]
        self.template = build_template(recipe.template)
        self.strategy = self._build_strategy()
        self.environment = self._build_environment()
        self.tokenizer = load_tokenizer(recipe.model.name)
        self.context = context_length(recipe.model.name)
        gen_tokens = recipe.generation.max_new_tokens
        self.train_examples = self._load(recipe.data, "data", gen_tokens, self._reward_problem)
        self.estimator.fit(self.train_examples)
        eval_tokens = recipe.eval.max_new_tokens or gen_tokens
        eval_examples = self._load(recipe.eval.data, "eval.data", eval_tokens) if recipe.eval.data else []
        # the recipe's engine (tools and environments included); not a second vLLM instance beside training's
        self.evals = HeldOutEvals(
            self.dir,
            recipe.eval,
            eval_examples,
            self.template,
            build_verifier(recipe.eval.verifier),
            gen_tokens,
            recipe.run.seed + 7919,
            self._engine if recipe.generation.engine != "vllm" else None,
        )
        self.sft_targets = self._sft_targets() if recipe.sft.steps else []
        self.reward_model_items = self._reward_model_items() if recipe.reward_model.steps else ([], [])
        self._prepare_dir(overwrite)
        self.metrics = MetricsLog(self.dir / "metrics.jsonl", build_sinks(recipe, self.dir))
        self.checkpoints = Checkpoints(self.dir / "checkpoints", recipe.run.keep_last)
        self.comparison: dict[str, Any] | None = None
        """RL's eval against the stage before it, paired over the same prompts, once the run has ended."""

    def _build_strategy(self) -> RolloutStrategy:
        """The recipe's rollout strategy; one that forces prefixes needs an engine that can force them."""
        cfg, engine = self.recipe.rollout, self.recipe.generation.engine
        strategy: RolloutStrategy = _build(ROLLOUT_STRATEGIES, "rollout", cfg.name, cfg.args)
        if strategy.forces_prefix and not ENGINES.get(engine).forced_prefixes:
            raise ConfigError(
                f"rollout '{cfg.name}' forces assistant prefixes, which generation.engine '{engine}' cannot do; "
                "use generation.engine: cached or hf"
            )
        return strategy

    def _build_environment(self) -> Callable[[], Environment] | None:
        """What builds each episode's environment (the ``tools`` section is the tool environment's), tried once
        now so that bad arguments fail before any model loads; None without one."""
        recipe = self.recipe
        if recipe.tools is not None:
            name, args = "tools", recipe.tools.model_dump()
            needs = "tools need generation.engine: cached (its decode loop runs the tool turns)"
        elif recipe.environment is not None:
            name, args = recipe.environment.name, recipe.environment.args
            needs = "an environment needs generation.engine: cached (its decode loop runs the turns)"
        else:
            return None
        if recipe.generation.engine != "cached":
            raise ConfigError(needs)
        try:
            make = ENVIRONMENTS.get(name).factory(**args)
            make()
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"environment '{name}': {err}") from err
        return make

    def _check_critic(self) -> None:
        """A critic exactly when the estimator reads values: without one it cannot run, and one it never reads
        would be trained for nothing."""
        name, reads = self.recipe.advantage.name, "values" in self.estimator.needs
        if reads and self.recipe.critic is None:
            raise ConfigError(
                f"advantage '{name}' needs a critic's values: add a critic section, e.g. "
                "critic: {model: policy_head}"
            )
        if not reads and self.recipe.critic is not None:
            raise ConfigError(
                f"critic: advantage '{name}' reads no values, so the critic would train for nothing; use an "
                "estimator that does (gae) or drop the critic section"
            )
        backbone, policy = self.recipe.critic.name if self.recipe.critic else None, self.recipe.model.name
        if (
            backbone is not None
            and backbone != policy
            and load_tokenizer(backbone).get_vocab() != load_tokenizer(policy).get_vocab()
        ):
            raise ConfigError(
                f"critic.name: '{backbone}' has another tokenizer than the policy '{policy}', and the critic reads "
                "the policy's token ids; name a model with the same tokenizer"
            )

    def _engine(self, policy: PreTrainedModel, tokenizer: Any, batch_size: int = 64) -> Engine:
        """The recipe's rollout engine; with an environment, wrapped so that episodes run turn by turn."""
        gen = self.recipe.generation
        engine = ENGINES.get(gen.engine).build(policy, tokenizer, batch_size, gen)
        if self.environment is None:
            return engine
        cfg = self.recipe.environment
        return EnvironmentEngine(
            engine,
            self.environment,
            cfg.name if cfg else "tools",
            cfg.max_turns if cfg else None,
            cfg.max_turn_tokens if cfg else None,
            (cfg.max_context_tokens if cfg else None) or self.context,
        )

    def _load(
        self,
        cfg: DataConfig,
        name: str,
        max_new_tokens: int,
        problem: Callable[[Example], str | None] | None = None,
    ) -> list[Example]:
        """Valid examples whose prompts fit the model's context with room for ``max_new_tokens`` and in which
        ``problem`` (when given) finds nothing wrong."""
        result = load_examples(cfg)
        usable, unusable = keep_usable(result.examples, cfg, problem) if problem else (result.examples, [])
        examples, too_long = fit_to_context(
            usable,
            cfg,
            lambda e: len(self.tokenizer(self.template.render(e, self.tokenizer)).input_ids),
            max_new_tokens,
            self.context,
        )
        skipped = result.skipped + unusable + too_long
        if skipped:
            print(f"[incentive] {name}: skipped {len(skipped)} bad rows, e.g. {skipped[0]}")
        return examples

    def _reward_problem(self, example: Example) -> str | None:
        """Why rewards of the recipe cannot score ``example`` at all (e.g. a column they need is missing): each
        problem once, with the rewards that have it."""
        names: dict[str, list[str]] = {}
        for name, _, part in self.rewards.parts:
            for problem in part.data_problems(example):
                names.setdefault(problem, []).append(f"'{name}'")
        if not names:
            return None
        parts = []
        for problem, who in names.items():
            also = f" (and {', '.join(who[1:])})" if len(who) > 1 else ""
            parts.append(f"reward {who[0]}{also} {problem}")
        return "; ".join(parts)

    def _sft_targets(self) -> list[tuple[Example, str]]:
        """The SFT stage's (example, target completion) pairs. Data without worked solutions refuses the run,
        or, with ``sft.without_solutions: skip`` (a recipe's SFT on data --set replaced), drops the stage."""
        cfg = self.recipe.sft
        data = cfg.data or self.recipe.data
        examples = self._load(data, "sft.data" if cfg.data else "data (for SFT)", 0)
        try:
            return sft_pairs(examples, self.template.tags, data.source)
        except MissingSolutions as err:
            if cfg.without_solutions == "error" or not self.recipe.rl.steps:
                raise MissingSolutions(
                    err.source, None, None, f"sft.steps is {cfg.steps}, but {err.problem}; set sft.steps=0"
                ) from None
        print(
            f"[incentive] skipped the recipe's {cfg.steps} SFT steps: {data.source} has no worked solutions "
            "(a 'reasoning' column, or a task with a solution writer); give SFT data with --set sft.data.source"
        )
        self.recipe = self.recipe.model_copy(update={"sft": cfg.model_copy(update={"steps": 0})})
        return []

    def _reward_model_items(self) -> tuple[list[Encoded], list[Encoded]]:
        """The reward-model stage's (training, held-out) rows, encoded for its backbone, so that bad data fails
        the run now, before any model loads."""
        cfg = self.recipe.reward_model
        data = cfg.data
        assert data is not None  # RewardModelConfig requires data when it has steps
        backbone = cfg.backbone or self.recipe.model.name
        same = backbone == self.recipe.model.name
        self.reward_tokenizer = self.tokenizer if same else load_tokenizer(backbone)
        loaded = load_preferences(data, cfg.objective)
        encoded, too_long = encode_rows(loaded.rows, self.reward_tokenizer, context_length(backbone), data)
        skipped = loaded.skipped + too_long
        if skipped:
            print(f"[incentive] reward_model.data: skipped {len(skipped)} bad rows, e.g. {skipped[0]}")
        return split_held_out(encoded, cfg.eval_share, self.recipe.run.seed)

    def _prepare_dir(self, overwrite: bool) -> None:
        """Lock the run folder, then check it against --resume/--overwrite and write the resolved config. The lock
        comes first, so that nothing of a run another process holds is read, written or deleted; it is held
        until :meth:`execute` ends (or the process does)."""
        config_file = self.dir / "config.yaml"
        if self.resume and not config_file.exists():
            raise RunError(f"--resume: {self.dir} holds no run to resume")
        self.lock = RunLock(self.dir)
        try:
            self.lock.acquire()
        except RunFolderBusy as err:
            raise RunError(str(err)) from None
        try:
            held = [path for path in self.dir.iterdir() if path.name != LOCK_NAME]
            if held and not self.resume:
                if not overwrite:
                    raise RunError(
                        f"{self.dir} already holds a run; pass --resume to continue it, --overwrite to replace "
                        "it, or choose another --run-dir"
                    )
                for path in held:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            config_file.write_text(yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))
        except BaseException:
            self.lock.release()
            raise

    # -- the run ----------------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        """Run the stages; the run folder's lock is freed when they end, however they end."""
        try:
            return self._execute()
        finally:
            self.lock.release()

    def _execute(self) -> dict[str, Any]:
        recipe = self.recipe
        transformers.utils.logging.disable_progress_bar()
        keep_freed_memory()
        if recipe.run.threads:
            torch.set_num_threads(recipe.run.threads)
        seed_everything(recipe.run.seed)
        tokenizer = self.tokenizer
        ckpt = self.checkpoints.latest() if self.resume else None
        state = self.checkpoints.load_state(ckpt) if ckpt else None
        if ckpt is not None:
            print(f"[incentive] resuming from {ckpt.name}")
        resumed_stage = state["stage"] if state else None

        if recipe.reward_model.steps and resumed_stage in (None, "reward_model"):
            with torch.random.fork_rng():  # the policy stages draw the same numbers with or without this one
                self._run_reward_model(ckpt if resumed_stage == "reward_model" else None, state)
        if recipe.sft.steps or recipe.rl.steps:
            policy = build_policy(recipe.model)
            if ckpt is not None and resumed_stage != "reward_model":
                load_policy_weights(policy, ckpt / "policy")
            self.evals.run("base", policy, tokenizer)
            if recipe.sft.steps and resumed_stage != "rl":
                self._run_sft(policy, tokenizer, state if resumed_stage == "sft" else None)
                self.evals.run("sft", policy, tokenizer)
            if recipe.rl.steps:
                self._run_rl(policy, tokenizer, state if resumed_stage == "rl" else None)
                self.evals.run("rl", policy, tokenizer)
        evals = self.evals.done()
        summary = {k: {m: v[m] for m in ("accuracy", "format_rate", "length_mean")} for k, v in evals.items()}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.comparison = self.evals.compare_stages()
        self.metrics.close()
        return summary

    def _stage_loop(self, tokenizer: Any) -> StageLoop:
        """The loop that drives each stage; checkpoints save ``tokenizer`` beside the stage's model."""
        return StageLoop(self.dir, self.metrics, self.checkpoints, tokenizer, self.recipe.run.checkpoint_every)

    def _run_sft(self, policy: PreTrainedModel, tokenizer: Any, state: dict[str, Any] | None) -> None:
        cfg, recipe = self.recipe.sft, self.recipe
        optimizer = build_optimizer(trainable_parameters(policy), recipe.optim, lr=cfg.lr)
        scheduler = build_scheduler(
            optimizer, recipe.optim.model_copy(update={"schedule": "constant"}), cfg.steps
        )
        pairs = [(self.template.render(e, tokenizer), target) for e, target in self.sft_targets]
        trainer = SFTTrainer(
            policy,
            tokenizer,
            pairs,
            cfg.batch_size,
            optimizer,
            scheduler,
            recipe.run.seed,
            recipe.rl.micro_batch_tokens,
            recipe.optim.max_grad_norm,
            ObservationMaskingEncoder(tokenizer, self.environment()) if self.environment else None,
            cfg.grad_accum,
            logprob_backend(recipe.model.backend),
        )
        self._stage_loop(tokenizer).run(trainer, cfg.steps, self.hooks, state)

    def _run_reward_model(self, ckpt: Path | None, state: dict[str, Any] | None) -> None:
        """Train the reward model (from the checkpoint ``ckpt`` when resuming one of this stage) and save it to
        RUN_DIR/reward_model; its records in metrics.jsonl carry the held-out eval where one ran."""
        cfg, recipe = self.recipe.reward_model, self.recipe
        tokenizer = self.reward_tokenizer
        model = build_reward_model(cfg.backbone or recipe.model.name, tokenizer.pad_token_id, cfg.lora)
        optimizer = build_optimizer(trainable_parameters(model), recipe.optim, lr=cfg.lr)
        scheduler = build_scheduler(
            optimizer, recipe.optim.model_copy(update={"schedule": "constant"}), cfg.steps
        )
        train, held_out = self.reward_model_items
        trainer = RewardModelTrainer(
            model,
            tokenizer.pad_token_id,
            cfg.objective,
            train,
            held_out,
            cfg.batch_size,
            optimizer,
            scheduler,
            recipe.run.seed,
            recipe.optim.max_grad_norm,
        )
        if ckpt is not None and state is not None:
            load_policy_weights(model, ckpt / "reward_model")
        results: list[dict[str, Any]] = []

        def evaluate(step: int) -> dict[str, Any]:
            results.append(trainer.evaluate())
            return results[-1]

        held_out_eval = HeldOutEval("reward_model", cfg.eval_every, cfg.steps, evaluate, at_last=True)
        self._stage_loop(tokenizer).run(trainer, cfg.steps, [held_out_eval], state)
        folder = self.dir / "reward_model"
        save_reward_model(model, tokenizer, folder)
        result = results[-1] if results else {}
        held = (
            f"held-out pairwise accuracy {result['eval/accuracy']:.1%} ({result['eval/n']} rows); "
            if "eval/accuracy" in result
            else ""
        )
        print(f"[incentive] reward model: {held}saved to {folder} (the path of a reward_model reward)")

    def _run_rl(self, policy: PreTrainedModel, tokenizer: Any, state: dict[str, Any] | None) -> None:
        recipe = self.recipe
        optimizer = build_optimizer(trainable_parameters(policy), recipe.optim)
        scheduler = build_scheduler(optimizer, recipe.optim, recipe.rl.steps)
        proxy = self._build_proxy(policy)
        views: dict[str, Any] = {"policy": model_view(policy)}
        if proxy is not None:
            views["proxy"] = proxy.view
        parts = RLParts(
            policy=policy,
            tokenizer=tokenizer,
            template=self.template,
            engine=self._engine(policy, tokenizer),
            rewards=self.rewards,
            estimator=self.estimator,
            loss=build_policy_loss(recipe.loss, float(recipe.generation.max_new_tokens)),
            optimizer=optimizer,
            scheduler=scheduler,
            sampler=EpochSampler(self.train_examples, recipe.run.seed),
            scorer=ModelScorer(views, recipe.rl.micro_batch_tokens, logprob_backend(recipe.model.backend)),
            reference=self._build_reference(policy, proxy),
            strategy=self.strategy,
            critic=self._build_critic(policy),
        )
        hooks = [ProxySync(proxy, recipe.proxy.sync_every, recipe.proxy.alpha)] if proxy is not None else []
        hooks += self.hooks

        def evaluate(step: int) -> dict[str, Any]:
            result = self.evals.run(f"rl-step{step}", policy, tokenizer)
            return {"eval/accuracy": result["accuracy"]} if result else {}

        hooks.append(HeldOutEval("rl", recipe.eval.every, recipe.rl.steps, evaluate))
        self._stage_loop(tokenizer).run(RLTrainer(recipe, parts), recipe.rl.steps, hooks, state)

    def _build_critic(self, policy: PreTrainedModel) -> Critic | None:
        """PPO's critic (its weights, optimizer and schedule travel in the RL checkpoints' trainer.pt)."""
        cfg, recipe = self.recipe.critic, self.recipe
        if cfg is None:
            return None
        return build_critic(
            cfg,
            policy,
            recipe.model,
            recipe.optim,
            recipe.rl.steps,
            recipe.rl.micro_batch_tokens,
            recipe.run.seed,
        )

    def _build_proxy(self, policy: PreTrainedModel) -> Any:
        if not self.recipe.proxy.enabled:
            return None
        from incentive.proxy import make_proxy

        cfg = self.recipe.proxy
        return make_proxy(policy, "ema" if cfg.sync_every else "frozen", cfg.lora_sync)

    def _build_reference(self, policy: PreTrainedModel, proxy: Any) -> Any:
        """The KL anchor: the proxy, or the policy as RL first started. Built for a KL penalty, or for an
        estimator that needs reference logprobs."""
        if self.recipe.loss.kl_beta == 0 and "reference_logprobs" not in self.estimator.needs:
            return None
        if self.recipe.loss.kl_reference == "proxy":
            return proxy.view
        return initial_reference(policy, self.recipe.model, self.dir)


def _build(registry: Registry[Any], kind: str, name: str, args: dict[str, Any]) -> Any:
    """A part from its registry, with a bad name or argument reported as a config error."""
    try:
        return registry.get(name)(**args)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{kind} '{name}': {err}") from err
