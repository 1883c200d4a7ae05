"""Reward-model stage: a sequence classifier with one output, built on a causal LM's weights, trained with the
Bradley–Terry loss on preference pairs or squared error on labelled completions. It scores a prompt and a response
rendered as one chat (the prompt as the user turn, the response as the assistant's), in training and in RL."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from incentive.config import LoraConfig
from incentive.data.example import DataError
from incentive.data.preferences import LabelledCompletion, Objective, PreferenceDataConfig, RewardRow
from incentive.models.fused_mlp import use_fused_swiglu
from incentive.models.fused_norm import use_fused_rms_norm
from incentive.models.loading import resolve
from incentive.models.lora import is_lora
from incentive.training.optim import clipped_step
from incentive.training.sampler import EpochSampler
from incentive.training.stage import Stage

T = TypeVar("T")


def render(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> str:
    """The text a reward model scores: the tokenizer's chat template over a user turn (the prompt) and an
    assistant turn (the response), or the two joined by a blank line where it has no template."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False))
    return f"{prompt}\n\n{response}"


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> list[int]:
    """Token ids of :func:`render`'s text (a chat template writes its own special tokens)."""
    text = render(tokenizer, prompt, response)
    return list(tokenizer(text, add_special_tokens=not tokenizer.chat_template).input_ids)


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a preference pair's two renderings."""

    chosen: list[int]
    rejected: list[int]


@dataclass(frozen=True)
class EncodedLabel:
    """Token ids of a labelled completion's rendering, and its label."""

    ids: list[int]
    label: float


Encoded = EncodedPair | EncodedLabel


def encode_rows(
    rows: Sequence[RewardRow],
    tokenizer: PreTrainedTokenizerBase,
    context: int | None,
    cfg: PreferenceDataConfig,
) -> tuple[list[Encoded], list[DataError]]:
    """Each row's renderings as token ids; a rendering longer than the backbone's ``context`` raises a DataError
    naming its row and field, or is left out and returned when ``cfg.on_error`` is 'skip'."""
    encoded: list[Encoded] = []
    skipped: list[DataError] = []
    for row in rows:
        if isinstance(row, LabelledCompletion):
            item: Encoded = EncodedLabel(encode(tokenizer, row.prompt, row.completion), row.label)
            lengths = {cfg.completion_field: len(item.ids)}
        else:
            chosen, rejected = (encode(tokenizer, row.prompt, text) for text in (row.chosen, row.rejected))
            item = EncodedPair(chosen, rejected)
            lengths = {cfg.chosen_field: len(item.chosen), cfg.rejected_field: len(item.rejected)}
        field_name, tokens = max(lengths.items(), key=lambda kv: kv[1])
        if context is None or tokens <= context:
            encoded.append(item)
            continue
        error = DataError(
            cfg.source,
            row.row,
            field_name,
            f"with its prompt, rendered as a chat, it is {tokens} tokens: more than the backbone's context of "
            f"{context} tokens",
        )
        if cfg.on_error == "raise":
            raise error
        skipped.append(error)
    if not encoded:
        problem = f"no reward-model rows fit the backbone's context; the first: {skipped[0]}"
        raise DataError(cfg.source, None, None, problem)
    return encoded, skipped


def split_held_out(items: Sequence[T], share: float, seed: int) -> tuple[list[T], list[T]]:
    """(training, held-out) items: a seeded ``share`` of them held out (at least one where ``share`` > 0, never
    all), each part in its original order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n = round(len(items) * share)
    n = min(max(n, 1 if share > 0 else 0), len(items) - 1)
    held = set(order[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(r_chosen − r_rejected): the negative log-likelihood of the preferences under Bradley–Terry."""
    return -F.logsigmoid(chosen - rejected).mean()


def regression_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the scores to the labels."""
    return F.mse_loss(scores, labels)


def pairwise_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Share of item pairs with different labels that the scores order as the labels do (a tie in score counts
    half); None where all labels are equal."""
    higher = labels[:, None] > labels[None, :]
    if not higher.any():
        return None
    gaps = (scores[:, None] - scores[None, :])[higher]
    return float(((gaps > 0).float() + 0.5 * (gaps == 0).float()).mean())


def build_reward_model(backbone: str, pad_token_id: int, lora: LoraConfig | None = None) -> PreTrainedModel:
    """A one-output sequence classifier on ``backbone``'s weights (any name ``load_model`` takes; the head is new
    unless the backbone is a reward model already). The pad token is set in its config, so the head reads each
    row's last token that is not padding; with ``lora``, only adapters (and the head) train."""
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve(backbone), num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = pad_token_id
    use_fused_rms_norm(model)
    use_fused_swiglu(model)
    if lora is None:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    adapters = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="SEQ_CLS",
    )
    return get_peft_model(model, adapters)


def sequence_scores(model: PreTrainedModel, ids: Sequence[Sequence[int]], pad_token_id: int) -> torch.Tensor:
    """The model's score of each token sequence, batched with right padding (so positions are those of the
    sequence alone)."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    out = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
    return out.logits[:, 0].float()


def save_reward_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write the model (LoRA adapters merged into its weights) and its tokenizer to ``folder``, replacing it
    atomically: a plain Hugging Face folder that ``AutoModelForSequenceClassification`` loads. Merging unloads a
    LoRA model's adapters, so this comes after its last step."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain = model.merge_and_unload() if is_lora(model) else model
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)


class RewardModelTrainer(Stage):
    """Optimizer steps of the reward model's objective on batches of ``batch_size`` training items (pairs or
    labelled completions), and its loss and pairwise accuracy on the held-out items."""

    name = "reward_model"
    label = "RM"
    folder = "reward_model"

    def __init__(
        self,
        model: PreTrainedModel,
        pad_token_id: int,
        objective: Objective,
        train: list[Encoded],
        held_out: list[Encoded],
        batch_size: int,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        seed: int,
        max_grad_norm: float | None,
    ) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.objective = objective
        self.held_out = held_out
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.sampler = EpochSampler(train, seed)

    def step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = self.sampler.take(self.batch_size)
        self.model.train()
        loss, stats = self._objective(*self._scores(batch))
        loss.backward()
        norm = clipped_step(self.optimizer, self.max_grad_norm)
        self.scheduler.step()
        return {
            "stage": "reward_model",
            "step": step,
            "loss": float(loss.detach()),
            **stats,
            "grad_norm": float(norm),
            "lr": self.scheduler.get_last_lr()[0],
            "time/step_s": time.perf_counter() - t0,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``eval/loss``, ``eval/accuracy`` (pairwise) and ``eval/n`` over the held-out items (empty: none)."""
        if not self.held_out:
            return {}
        self.model.eval()
        size = self.batch_size
        parts = [self._scores(self.held_out[i : i + size]) for i in range(0, len(self.held_out), size)]
        first, second = (torch.cat(part) for part in zip(*parts, strict=True))
        loss, stats = self._objective(first, second)
        held_out = {f"eval/{key}": value for key, value in stats.items()}
        return {"eval/loss": float(loss), **held_out, "eval/n": len(self.held_out)}

    def _scores(self, batch: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores of pairs, or (scores, labels) of labelled completions, in one forward pass."""
        if self.objective == "bradley_terry":
            pairs = [item for item in batch if isinstance(item, EncodedPair)]
            ids = [p.chosen for p in pairs] + [p.rejected for p in pairs]
            chosen, rejected = sequence_scores(self.model, ids, self.pad_token_id).split(len(pairs))
            return chosen, rejected
        rows = [item for item in batch if isinstance(item, EncodedLabel)]
        scores = sequence_scores(self.model, [r.ids for r in rows], self.pad_token_id)
        return scores, torch.tensor([r.label for r in rows], dtype=scores.dtype)

    def _objective(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss and its companions (pairwise accuracy; the mean margin of pairs) of :meth:`_scores`' output."""
        if self.objective == "bradley_terry":
            gaps = (first - second).detach()
            accuracy = float(((gaps > 0).float() + 0.5 * (gaps == 0).float()).mean())
            return bradley_terry_loss(first, second), {"accuracy": accuracy, "margin": float(gaps.mean())}
        accuracy = pairwise_accuracy(first.detach(), second)
        return regression_loss(first, second), {} if accuracy is None else {"accuracy": accuracy}
