"""PPO's critic: a value model V(s_t) (a head on the policy, or a model of its own), its own optimizer and
schedule, and its update on the clipped value loss. V(s_t) is the value of the state before completion token t:
the scalar head reads the last hidden state at the position whose logits predict token t."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from incentive.config import CriticConfig, ModelConfig, OptimConfig
from incentive.logprobs import plan_batches
from incentive.losses import clipped_value_loss
from incentive.models import load_model
from incentive.models.lora import base_model
from incentive.training.batch import TrainingBatch, pad
from incentive.training.optim import build_optimizer, build_scheduler, clipped_step


def last_hidden(
    body: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    indices: Sequence[int],
) -> list[torch.Tensor]:
    """The body's last hidden state before each target token of ``indices``' rows, [len(target), H] per row. Rows
    are right-padded, so every row keeps the positions it has alone."""
    if any(not contexts[i] for i in indices):
        raise ValueError("a value needs at least one context token before the target")
    rows = [[*contexts[i], *targets[i]] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[k, : len(row)] = 1
    states = body(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    starts = [len(contexts[i]) - 1 for i in indices]
    return [
        states[k, s : s + len(targets[i])].float()
        for k, (s, i) in enumerate(zip(starts, indices, strict=True))
    ]


def _zero_head(hidden_size: int) -> torch.nn.Linear:
    """A scalar head whose first values are all 0."""
    head = torch.nn.Linear(hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


class ValueModel(ABC):
    """Per-token values of completions: a zero-initialised linear head on some body's last hidden state."""

    head: torch.nn.Linear
    frozen_body: ClassVar[bool] = False
    """True when the features carry no gradient (the head alone trains): a step's update may then reuse the
    features its values were computed from."""

    @abstractmethod
    def hidden(
        self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], indices: Sequence[int]
    ) -> list[torch.Tensor]:
        """The features the head reads, [len(target), H] per row of ``indices``."""

    @abstractmethod
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the critic's optimizer trains and its checkpoints hold, by stable name."""

    def train(self, on: bool) -> None:  # noqa: B027  (a hook; a head on the policy leaves the policy's mode alone)
        """Training mode (dropout) of what the critic owns."""

    def values(
        self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], indices: Sequence[int]
    ) -> list[torch.Tensor]:
        """V(s_t) for each target token of ``indices``' rows."""
        return [self.head(h).squeeze(-1) for h in self.hidden(contexts, targets, indices)]


class PolicyHead(ValueModel):
    """A linear head on the policy's own last hidden state. The features are detached: the value loss trains the
    head alone and never moves the policy, which its own loss does. The critic updates before the policy, so one
    gradient-free pass of the policy per step gives the features of both its values and its update."""

    frozen_body = True

    def __init__(self, policy: PreTrainedModel) -> None:
        base = base_model(policy)
        self.body = base.get_decoder()
        self.head = _zero_head(base.config.hidden_size)

    def hidden(
        self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], indices: Sequence[int]
    ) -> list[torch.Tensor]:
        with torch.no_grad():
            return last_hidden(self.body, contexts, targets, indices)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {f"head.{n}": q for n, q in self.head.named_parameters()}


class SeparateModel(ValueModel):
    """A model of its own: a causal LM's body (its LM head dropped), with LoRA adapters where configured, and a
    scalar head, trained together."""

    def __init__(self, name: str, cfg: CriticConfig, onednn: bool | None) -> None:
        model = load_model(name, onednn=onednn)
        body: torch.nn.Module = model.get_decoder()
        self.head = _zero_head(model.config.hidden_size)
        if cfg.lora is not None:
            from peft import LoraConfig, get_peft_model

            adapters = LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
            )
            body = get_peft_model(body, adapters)
        self.body = body

    def hidden(
        self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], indices: Sequence[int]
    ) -> list[torch.Tensor]:
        return last_hidden(self.body, contexts, targets, indices)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        body = {f"body.{n}": q for n, q in self.body.named_parameters() if q.requires_grad}
        return {**body, **{f"head.{n}": q for n, q in self.head.named_parameters()}}

    def train(self, on: bool) -> None:
        self.body.train(on)


class Critic:
    """The value model with its AdamW and schedule: values for the estimator, then one optimizer step per
    iteration on the clipped value loss against the estimator's returns (token mean over the policy's tokens)."""

    def __init__(
        self,
        model: ValueModel,
        cfg: CriticConfig,
        optim: OptimConfig,
        total_steps: int,
        micro_batch_tokens: int,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.micro_batch_tokens = micro_batch_tokens
        self.params = model.trainable()
        self.optimizer = build_optimizer(list(self.params.values()), optim, lr=cfg.learning_rate)
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps)
        self.features: dict[int, torch.Tensor] = {}
        """Row → the features of this step's values, kept for its update where the body is frozen."""

    def _rows(self, batch: TrainingBatch) -> list[int]:
        return [i for i in batch.trained_rows if bool(batch.mask[i].any())]

    @torch.no_grad()
    def values(self, batch: TrainingBatch) -> torch.Tensor:
        """[B, T]: V(s_t) on the trained rows, 0 elsewhere."""
        rows = self._rows(batch)
        contexts = [batch.contexts[i] for i in rows]
        targets = [batch.targets[i] for i in rows]
        self.model.train(False)
        found: dict[int, torch.Tensor] = {}
        self.features = {}
        for chunk in plan_batches(contexts, targets, self.micro_batch_tokens):
            for k, h in zip(chunk, self.model.hidden(contexts, targets, chunk), strict=True):
                found[rows[k]] = self.model.head(h).squeeze(-1)
                if self.model.frozen_body:
                    self.features[rows[k]] = h
        return batch.scatter(list(found), list(found.values()))

    def _values_with_grad(
        self, contexts: list[list[int]], targets: list[list[int]], chunk: list[int], rows: list[int]
    ) -> list[torch.Tensor]:
        """V(s_t) of a chunk's rows for the loss: from the kept features where the body is frozen."""
        if self.model.frozen_body and all(rows[k] in self.features for k in chunk):
            return [self.model.head(self.features[rows[k]]).squeeze(-1) for k in chunk]
        return self.model.values(contexts, targets, chunk)

    def update(self, batch: TrainingBatch, iterations: int) -> dict[str, float]:
        """``iterations`` optimizer steps on the batch; the critic's metrics. The values the estimator used are
        V_old, its returns the targets."""
        rows = self._rows(batch)
        if not rows or batch.values is None or batch.returns is None:
            return self.skip()
        contexts = [batch.contexts[i] for i in rows]
        targets = [batch.targets[i] for i in rows]
        tokens = float(batch.mask[rows].sum())
        stats = fit_stats(batch.values[rows], batch.returns[rows], batch.mask[rows])
        losses, clipped, norms = [], [], []
        lr = self.scheduler.get_last_lr()[0]
        self.model.train(True)
        for _ in range(iterations):
            total = share = 0.0
            for chunk in plan_batches(contexts, targets, self.micro_batch_tokens):
                idx = [rows[k] for k in chunk]
                width = max(len(targets[k]) for k in chunk)
                values = pad(self._values_with_grad(contexts, targets, chunk, rows), width)
                mask = batch.mask[idx, :width]
                loss, was_clipped = clipped_value_loss(
                    values, batch.values[idx, :width], batch.returns[idx, :width], self.cfg.value_clip
                )
                loss = (loss * mask).sum() / tokens
                loss.backward()
                total += float(loss.detach())
                share += float((was_clipped * mask).sum()) / tokens
            losses.append(total)
            clipped.append(share)
            norms.append(self._optimizer_step())
        self.scheduler.step()
        self.features = {}
        return {
            **stats,
            "critic/value_loss": sum(losses) / len(losses),
            "critic/clip_frac": sum(clipped) / len(clipped),
            "critic/grad_norm": sum(norms) / len(norms),
            "critic/lr": lr,
        }

    def skip(self) -> dict[str, float]:
        """No update this step; the schedule still follows the step."""
        self.features = {}
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a schedule stepped before its first optimizer step
            self.scheduler.step()
        return {}

    def _optimizer_step(self) -> float:
        return clipped_step(self.optimizer, self.cfg.max_grad_norm)

    def state_dict(self) -> dict[str, Any]:
        """Weights (the trainable ones), optimizer and schedule: what a resumed run needs to continue exactly."""
        return {
            "weights": {n: q.detach().clone() for n, q in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        if set(weights) != set(self.params):
            raise RuntimeError(
                f"the checkpoint's critic does not match the recipe's: it has {sorted(set(weights) - set(self.params))}"
                f" and lacks {sorted(set(self.params) - set(weights))}"
            )
        with torch.no_grad():
            for name, q in self.params.items():
                q.copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def fit_stats(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How well the values the estimator used fit the returns, over the masked tokens: ``critic/value_mean``,
    ``critic/return_mean`` and ``critic/explained_variance`` = 1 − Var(R − V) / Var(R) (absent where the
    returns do not vary)."""
    n = mask.sum()

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum() / n

    def var(x: torch.Tensor) -> torch.Tensor:
        return mean((x - mean(x)) ** 2)

    out = {"critic/value_mean": float(mean(values)), "critic/return_mean": float(mean(returns))}
    spread = var(returns)
    if spread > 0:
        out["critic/explained_variance"] = float(1 - var(returns - values) / spread)
    return out


def build_critic(
    cfg: CriticConfig,
    policy: PreTrainedModel,
    model: ModelConfig,
    optim: OptimConfig,
    total_steps: int,
    micro_batch_tokens: int,
    seed: int,
) -> Critic:
    """The recipe's critic. Random initialisation (LoRA adapters) draws from its own generator seeded by ``seed``,
    so adding a critic leaves the run's random stream, and so its rollouts, as they were."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if cfg.model == "policy_head":
            value_model: ValueModel = PolicyHead(policy)
        else:
            value_model = SeparateModel(cfg.name or model.name, cfg, model.onednn)
    return Critic(value_model, cfg, optim, total_steps, micro_batch_tokens)
