"""One RL step = one pass down the pipe: sample prompts → rollouts → rewards → advantages → loss → update."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.advantages import Estimator
from incentive.config import Recipe
from incentive.data.example import Example
from incentive.engines import Engine, SamplingParams
from incentive.evaluation import build_verifier, lenient_answer
from incentive.logprob_backends import logprob_backend
from incentive.logprobs import plan_batches
from incentive.losses import PolicyLoss, Totals
from incentive.models import bf16_products
from incentive.rewards.base import RewardContext, Scorer
from incentive.rewards.pipeline import RewardPipeline, Scored
from incentive.rewards.verifier import AnswerReward, RuleVerifier, extract_answer
from incentive.rollout.sampling import plan_requests, sample_requests
from incentive.rollout.strategy import Plain, RolloutContext, RolloutStrategy
from incentive.rollout.types import Completion, RolloutBatch, group_indices
from incentive.templates import Parsed, SingleBlockFormat, TagFormat, Template
from incentive.training.batch import TrainingBatch, pad
from incentive.training.critic import Critic
from incentive.training.metrics import summarize
from incentive.training.optim import clipped_step
from incentive.training.sampler import EpochSampler
from incentive.training.stage import Stage, StageStateMismatch, StepFailed

ModelView = Callable[[], AbstractContextManager[PreTrainedModel]]


class TooManyFailures(StepFailed):
    """More of a batch failed its rewards than the recipe tolerates."""


@dataclass
class RLParts:
    """Everything an RL step uses, built once by the run."""

    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: Template
    engine: Engine
    rewards: RewardPipeline
    estimator: Estimator
    loss: PolicyLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: EpochSampler[Example]
    scorer: Scorer | None
    reference: ModelView | None
    critic: Critic | None = None
    """PPO's value model, for an estimator that needs values (``critic`` in the recipe)."""
    strategy: RolloutStrategy = field(default_factory=Plain)
    """How each example's group is sampled (``rollout`` in the recipe)."""


class RLTrainer(Stage):
    """GRPO-family trainer; the estimator, loss and rewards are whatever the recipe names."""

    name = "rl"
    label = "RL"

    def __init__(self, recipe: Recipe, parts: RLParts) -> None:
        self.recipe = recipe
        self.p = parts
        self.model, self.optimizer, self.scheduler = parts.policy, parts.optimizer, parts.scheduler
        self.sampler = parts.sampler
        gen = recipe.generation
        self.params = SamplingParams(
            gen.num_generations, gen.max_new_tokens, gen.temperature, gen.top_p, gen.min_new_tokens
        )
        self.group_counter = 0
        self.backend = logprob_backend(recipe.model.backend)
        """Logprobs of the update and of its old and reference policies (``model.backend``)."""
        self.verifier = sample_judge(recipe.eval.verifier)
        """Judges the logged completions after the fact, whatever the rewards are."""
        self.state: dict[str, Any] = {}
        """Shared with hooks and rewards (``RewardContext.state``); saved in checkpoints."""
        self.elapsed = 0.0
        """Seconds of rollout, reward and update so far (``rl.time_budget_s`` counts them)."""

    def step(self, step: int) -> dict[str, Any]:
        """Run one step and return its metrics record."""
        p, rl = self.p, self.recipe.rl
        times = {"generate": 0.0, "reward": 0.0}
        sampling: dict[str, float] = {}
        update = True
        # a stop request may drop the rollouts and rewards: they move only what position() saves
        with self.droppable():
            for hook in self.hooks:
                hook.before_rollout(step, self)
            examples = p.sampler.take(self.recipe.generation.prompts_per_step)
            batch, scored = self._rollout(step, examples, times)
            if rl.dynamic_sampling.enabled:
                kept, kept_scores, sampling = self._dynamic_sampling(step, batch, scored, times)
                # nothing varied even after refills: log the first round, skip the update
                update = len(kept) > 0
                if update:
                    batch, scored = kept, kept_scores
            for hook in self.hooks:
                hook.after_rewards(step, batch, scored, self)
        lr = p.scheduler.get_last_lr()[0]  # the rate this step's update uses; the scheduler steps past it
        t0 = time.perf_counter()
        training = TrainingBatch.from_rollouts(batch, scored.total, rl.mask_truncated)
        self._supply(training, batch)
        training.set_advantages(p.estimator.estimate(training))
        critic_stats = self._train_critic(training, update)
        with self._update_products():
            train_stats = self._optimise(training) if update else self._skip_update()
        t_train = time.perf_counter() - t0
        advantages = training.sequence_advantages
        assert advantages is not None
        record = self._record(
            step, batch, scored, advantages, train_stats, times["generate"], times["reward"], t_train
        )
        self.elapsed += times["generate"] + times["reward"] + t_train
        return {**record, "lr": lr, **sampling, **critic_stats, "time/rl_elapsed_s": self.elapsed}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "group_counter": self.group_counter,
            "shared_state": self.state,
            "critic": self.p.critic.state_dict() if self.p.critic is not None else None,
            "elapsed": self.elapsed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.group_counter = state["group_counter"]
        self.state.update(state["shared_state"])
        self.elapsed = state["elapsed"]
        if self.p.critic is not None:
            if state.get("critic") is None:
                raise StageStateMismatch(
                    "the checkpoint holds no critic, but the recipe has one; resume with the recipe the run "
                    "started with"
                )
            self.p.critic.load_state_dict(state["critic"])

    def position(self) -> Any:
        return super().position(), self.group_counter

    def rewind(self, position: Any) -> None:
        base, self.group_counter = position
        super().rewind(base)

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {
            "reward": f"{record.get('reward/mean', float('nan')):.3f}",
            "len": f"{record.get('length/mean', 0):.0f}",
        }

    def ends_early(self) -> str | None:
        budget = self.recipe.rl.time_budget_s
        if budget is not None and self.elapsed >= budget:
            return f"RL time budget of {budget:.0f} s used up"
        return None

    def _rollout(
        self, step: int, examples: Sequence[Example], times: dict[str, float]
    ) -> tuple[RolloutBatch, Scored]:
        """Each example's group as the rollout strategy plans it, scored; stops the run when too many fail their
        rewards."""
        p = self.p
        t0 = time.perf_counter()
        ctx = RolloutContext(p.template, p.tokenizer, self.params.n)
        plans = [p.strategy.variants(e, ctx) for e in examples]
        requests, used = plan_requests(examples, plans, self.group_counter, self.params)
        self.group_counter += used
        batch = sample_requests(p.engine, requests)
        t1 = time.perf_counter()
        ctx = RewardContext(
            p.tokenizer,
            p.template.tags,
            step=step,
            scorer=p.scorer,
            state=self.state,
            max_new_tokens=self.params.max_new_tokens,
            generate=self._extra_rollouts,
        )
        scored = p.rewards(batch, ctx)
        times["generate"] += t1 - t0
        times["reward"] += time.perf_counter() - t1
        failed = scored.failed
        if sum(failed) / len(batch) > self.recipe.rl.max_failed_share:
            raise TooManyFailures(
                f"step {step}: {sum(failed)}/{len(batch)} completions failed their rewards "
                f"(limit {self.recipe.rl.max_failed_share:.0%}): {dict(scored.failures)}"
            )
        return batch, scored

    def _extra_rollouts(self, examples: Sequence[Example], n: int) -> RolloutBatch:
        """Completions a reward asks for (e.g. on shuffled inputs): group id i is examples[i]; never trained on."""
        p = self.p
        prompts = [p.template.render(e, p.tokenizer) for e in examples]
        ids = list(range(len(examples)))
        return p.engine.generate(examples, prompts, ids, dataclasses.replace(self.params, n=n))

    def _dynamic_sampling(
        self, step: int, batch: RolloutBatch, scored: Scored, times: dict[str, float]
    ) -> tuple[RolloutBatch, Scored, dict[str, float]]:
        """DAPO dynamic sampling: keep the groups whose valid rewards vary (the others carry no signal) and
        refill the step with fresh prompts, for at most ``max_rounds`` extra generation rounds."""
        want = self.recipe.generation.prompts_per_step
        kept: list[tuple[RolloutBatch, Scored]] = []
        have = dropped = rounds = 0
        while True:
            keep = [idx for idx in batch.groups().values() if _varies([scored.total[i] for i in idx])]
            have += len(keep)
            dropped += len(batch.groups()) - len(keep)
            flat = [i for idx in keep for i in idx]
            kept.append((RolloutBatch([batch.completions[i] for i in flat]), scored.select(flat)))
            if have >= want or rounds >= self.recipe.rl.dynamic_sampling.max_rounds:
                break
            rounds += 1
            batch, scored = self._rollout(step, self.p.sampler.take(want - have), times)
        merged = RolloutBatch([c for b, _ in kept for c in b])
        stats = {
            "sampling/kept_groups": float(have),
            "sampling/dropped_groups": float(dropped),
            "sampling/extra_rounds": float(rounds),
        }
        return merged, Scored.concat([s for _, s in kept]), stats

    def _supply(self, training: TrainingBatch, batch: RolloutBatch) -> None:
        """What the estimator declares it needs, for the rows the update may train on."""
        needs, rows = self.p.estimator.needs, training.trained_rows
        if "step_rewards" in needs:
            training.step_rewards = [c.step_rewards for c in batch]
        if "values" in needs:
            if self.p.critic is None:
                raise RuntimeError("the advantage estimator needs values, but the run built no critic")
            training.values = self.p.critic.values(training)
        if "reference_logprobs" in needs and rows:
            contexts, targets = [training.contexts[i] for i in rows], [training.targets[i] for i in rows]
            training.reference_logprobs = training.scatter(rows, self._reference_logprobs(contexts, targets))

    def _train_critic(self, training: TrainingBatch, update: bool) -> dict[str, float]:
        """The critic's update on the batch, before the policy's (a head on the policy reads the features the
        values came from); skipped with the policy's."""
        critic = self.p.critic
        if critic is None:
            return {}
        return critic.update(training, self.recipe.rl.num_iterations) if update else critic.skip()

    def _update_products(self) -> AbstractContextManager[None]:
        """Where the update's linear products run in bf16 (``model.update_products``)."""
        return bf16_products.bf16_products() if self.recipe.model.update_products == "bfloat16" else nullcontext()

    def _optimise(self, batch: TrainingBatch) -> dict[str, float]:
        """Policy-gradient update on the batch; skips the forward/backward work that would contribute zero."""
        p, rl, loss_cfg = self.p, self.recipe.rl, self.recipe.loss
        advantages = batch.advantages
        assert advantages is not None, "the estimator runs before the update"
        valid = batch.trained_rows
        totals = Totals(tokens=int(batch.mask[valid].sum()), sequences=len(valid))
        needs_all = loss_cfg.kl_beta > 0 or not rl.skip_zero_advantage
        active = valid if needs_all else [i for i in valid if bool(advantages[i].any())]
        if not active:
            return {**self._skip_update(), "masked_truncated": float(batch.masked_truncated)}
        contexts = [batch.contexts[i] for i in active]
        targets = [batch.targets[i] for i in active]
        if loss_cfg.kl_beta > 0 and batch.reference_logprobs is None:
            batch.reference_logprobs = batch.scatter(active, self._reference_logprobs(contexts, targets))
        if rl.num_iterations > 1:
            batch.old_logprobs = batch.scatter(active, self._old_logprobs(contexts, targets))
        ref, old = batch.reference_logprobs if loss_cfg.kl_beta > 0 else None, batch.old_logprobs
        stats: dict[str, list[tuple[float, float]]] = {}
        losses: list[float] = []
        grad_norms: list[float] = []

        def loss_of(rows: list[int], logp: list[torch.Tensor]) -> torch.Tensor:
            """The loss of some active rows (indices into ``active``) given their logprobs."""
            at, width = [active[k] for k in rows], max(len(targets[k]) for k in rows)
            logp_t = pad(logp, width)
            mask = batch.mask[at, :width]
            old_t = old[at, :width] if old is not None else logp_t.detach()
            ref_t = ref[at, :width] if ref is not None else None
            loss, part_stats = p.loss(logp_t, old_t, advantages[at, :width], mask, totals, ref_t)
            tokens = float(mask.sum())
            for key, value in part_stats.items():
                stats.setdefault(key, []).append((value, tokens))
            return loss

        for _ in range(rl.num_iterations):
            total_loss = 0.0
            for chunk in plan_batches(contexts, targets, rl.micro_batch_tokens):
                total_loss += self.backend.backward(
                    p.policy, contexts, targets, chunk, loss_of, self.params.temperature, p.engine.prefilled
                )
            losses.append(total_loss)
            grad_norms.append(self._optimizer_step())
        p.scheduler.step()
        # Each part's statistics are means over its tokens; weighting by them gives means over the batch.
        out = {k: sum(x * w for x, w in v) / max(sum(w for _, w in v), 1.0) for k, v in stats.items()}
        out["loss"] = sum(losses) / len(losses)
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["nonfinite_updates"] = float(sum(not math.isfinite(g) for g in grad_norms))
        out["skipped"] = 0.0
        out["trained_sequences"] = float(len(active))
        out["target_tokens"] = float(sum(len(t) for t in targets))
        out["context_tokens"] = float(sum(len(c) for c in {tuple(c) for c in contexts}))
        out["masked_truncated"] = float(batch.masked_truncated)
        return out

    def _skip_update(self) -> dict[str, float]:
        """No optimizer step on purpose; the schedule still follows the step."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.p.scheduler.step()
        return {"skipped": 1.0}

    def _optimizer_step(self) -> float:
        norm = clipped_step(self.p.optimizer, self.recipe.optim.max_grad_norm)
        if math.isfinite(norm):
            self.p.engine.weights_changed()
            bf16_products.weights_changed()
        return norm

    @torch.no_grad()
    def _old_logprobs(self, contexts: list[list[int]], targets: list[list[int]]) -> list[list[float]]:
        lps = self.backend.score(
            self.p.policy, contexts, targets, self.recipe.rl.micro_batch_tokens, self.params.temperature
        )
        return [lp.tolist() for lp in lps]

    @torch.no_grad()
    def _reference_logprobs(self, contexts: list[list[int]], targets: list[list[int]]) -> list[list[float]]:
        if self.p.reference is None:
            raise RuntimeError(
                "reference logprobs wanted (a KL penalty or the estimator) but no reference was built"
            )
        with self.p.reference() as ref:
            lps = self.backend.score(
                ref, contexts, targets, self.recipe.rl.micro_batch_tokens, self.params.temperature
            )
        return [lp.tolist() for lp in lps]

    def _record(
        self,
        step: int,
        batch: RolloutBatch,
        scored: Scored,
        advantages: torch.Tensor,
        train: dict[str, float],
        t_gen: float,
        t_reward: float,
        t_train: float,
    ) -> dict[str, Any]:
        lengths = [float(c.length) for c in batch]
        gen_tokens = sum(c.length for c in batch)
        record: dict[str, Any] = {
            "stage": "rl",
            "step": step,
            "completions": len(batch),
            "truncated_share": sum(c.truncated for c in batch) / len(batch),
            "failed": sum(scored.failed),
            "failures": dict(scored.failures),
            "time/generate_s": t_gen,
            "time/reward_s": t_reward,
            "time/train_s": t_train,
            "throughput/gen_tokens_per_s": gen_tokens / max(t_gen, 1e-9),
            **summarize("reward", scored.total),
            **summarize("advantage", advantages.tolist()),
            **summarize("length", lengths),
            **{f"train/{k}": v for k, v in train.items()},
        }
        record.update(advantage_stats(advantages, scored.total, batch.group_ids))
        record.update(entropy_estimate(batch))
        parsed = [self.p.template.tags.parse(c.text) for c in batch]
        reasonings = [x.reasoning for x in parsed]
        reasoning_tokens = [
            float(len(self.p.tokenizer.encode(r, add_special_tokens=False))) for r in reasonings if r
        ]
        record.update(summarize("length/reasoning", reasoning_tokens))
        for name, values in scored.components.items():
            record.update(summarize(f"reward/{name}", values))
        for name, values in scored.extras.items():
            record.update(summarize(f"extra/{name}", values))
        record.update(_tool_stats(batch))
        record.update(environment_stats(batch))
        record.update(reward_by_label(batch, scored.total))
        tags = self.p.template.tags
        record["samples"] = [
            {**_sample(c, scored, i, reasonings[i]), **verdict(c, parsed[i], tags, self.verifier)}
            for i, c in enumerate(batch.completions[: self.params.n])
        ]
        return record


def _sample(c: Completion, scored: Scored, i: int, reasoning: str | None) -> dict[str, Any]:
    """One logged completion with its rewards, its reasoning and each part's per-sample values (e.g. NOVER's
    perplexity and its rank in the group); non-finite values become null so the JSON stays standard."""
    details: dict[str, dict[str, float | None]] = {}
    for key, values in scored.extras.items():
        part, _, name = key.partition("/")
        details.setdefault(part, {})[name] = _finite(values[i])
    return {
        "group": c.group_id,
        "prompt": c.example.prompt,
        "reference": c.example.reference,
        "completion": c.text,
        "reward": _finite(scored.total[i]),
        "components": {k: _finite(v[i]) for k, v in scored.components.items()},
        "reasons": scored.reasons[i],
        "reasoning": reasoning,
        "details": details,
        **({"labels": dict(c.labels)} if c.labels else {}),
    }


def sample_judge(eval_verifier: str) -> AnswerReward:
    """The held-out eval's verifier where it judges an answer on its own (rule, accepted wordings); for an LLM
    judge, which would cost a generation per logged sample, the rule verifier."""
    judge = build_verifier(eval_verifier)
    return judge if isinstance(judge, AnswerReward) else RuleVerifier()


def verdict(c: Completion, parsed: Parsed, tags: TagFormat, verifier: AnswerReward) -> dict[str, Any]:
    """The rule verifier's verdict on a logged completion, judged as the held-out eval judges (NOVER's reward never
    checks answers): ``correct`` reads the answer where the format puts it, ``correct_lenient`` wherever it is,
    ``answer`` is what it read; all None without a reference or when the format has no answer."""
    if not c.example.reference or isinstance(tags, SingleBlockFormat):
        return {"correct": None, "correct_lenient": None, "answer": None}
    strict = extract_answer(c.text, parsed.answer)
    correct = verifier.verify(c.example, strict).correct
    answer = lenient_answer(c.text, parsed.answer, tags.answer)
    lenient = correct or (answer != strict and verifier.verify(c.example, answer).correct)
    return {"correct": correct, "correct_lenient": lenient, "answer": answer}


def advantage_stats(
    advantages: torch.Tensor, scores: Sequence[float], group_ids: Sequence[int]
) -> dict[str, float]:
    """How much learning signal a step has: the advantages' std over completions (population), the share of
    completions with advantage exactly 0, and the share of groups whose valid rewards are all equal, which a
    group-relative estimator cannot learn from."""
    groups = list(group_indices(group_ids).values())
    flat = sum(not _varies([scores[i] for i in idx]) for idx in groups)
    return {
        "advantage/std": float(advantages.double().std(correction=0)),
        "advantage/zero_share": float((advantages == 0).float().mean()),
        "advantage/no_signal_group_share": flat / len(groups),
    }


def entropy_estimate(batch: RolloutBatch) -> dict[str, float]:
    """``policy/entropy_estimate``: the mean −logprob of the policy-written sampled tokens, from the engine's
    sampling logprobs (no extra forward pass). It estimates the mean per-token entropy of the sampling
    distribution; with top_p < 1, the cached and HF engines' logprobs are before top-p, which adds −log of the
    nucleus's mass. Completions without one logprob per token are left out."""
    total = tokens = 0.0
    for c in batch:
        if len(c.logprobs) != c.length:
            continue
        for logprob, weight in zip(c.logprobs, c.trained_mask, strict=True):
            total -= logprob * weight
            tokens += weight
    return {"policy/entropy_estimate": total / tokens} if tokens else {}


def _tool_stats(batch: RolloutBatch) -> dict[str, float]:
    """Tool use of a multi-turn batch: calls per rollout, share that used a tool, errors, policy-written length."""
    episodes = [c for c in batch if "tool_calls" in c.info]
    if not episodes:
        return {}
    executed = sum(c.info["tool_executed"] for c in episodes)
    return {
        "tools/calls_mean": sum(c.info["tool_calls"] for c in episodes) / len(episodes),
        "tools/use_rate": sum(c.info["tool_calls"] > 0 for c in episodes) / len(episodes),
        "tools/error_rate": sum(len(c.info["tool_errors"]) for c in episodes) / max(1, executed),
        "tools/final_error_share": sum(c.info["final_tool_error"] for c in episodes) / len(episodes),
        **summarize("length/generated", [sum(c.trained_mask) for c in episodes]),
    }


def environment_stats(batch: RolloutBatch) -> dict[str, float]:
    """Episodes of a multi-turn batch: turns per episode, share whose environment failed, and the step rewards
    (their sum per episode), when any were given."""
    episodes = [c for c in batch if "turns" in c.info]
    if not episodes:
        return {}
    out = {
        "env/turns_mean": sum(c.info["turns"] for c in episodes) / len(episodes),
        "env/failed_share": sum("failure" in c.info for c in episodes) / len(episodes),
    }
    if any(c.step_rewards for c in episodes):
        out.update(summarize("env/step_reward_sum", [sum(c.step_rewards.values()) for c in episodes]))
    return out


def reward_by_label(batch: RolloutBatch, totals: Sequence[float]) -> dict[str, float]:
    """``reward/by_<key>/<value>``: the mean valid reward of the completions labelled ``key: value`` (e.g.
    ``reward/by_mode/think``), and ``count/by_<key>/<value>`` their number; nothing when no completion has labels."""
    rewards: dict[tuple[str, str], list[float]] = {}
    for c, total in zip(batch, totals, strict=True):
        for key, value in c.labels.items():
            rewards.setdefault((key, value), []).append(total)
    out: dict[str, float] = {}
    for (key, value), values in sorted(rewards.items()):
        finite = [x for x in values if math.isfinite(x)]
        out[f"count/by_{key}/{value}"] = float(len(values))
        if finite:
            out[f"reward/by_{key}/{value}"] = sum(finite) / len(finite)
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _varies(scores: Sequence[float]) -> bool:
    """Whether a group's valid rewards differ (a group of one, or of equal rewards, has no signal)."""
    finite = [x for x in scores if math.isfinite(x)]
    return len(finite) > 1 and max(finite) > min(finite)
