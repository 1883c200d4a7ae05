"""A trained reward model as a reward part: a Hugging Face sequence classifier with one output (such as
RUN_DIR/reward_model of a run with the ``reward_model`` stage) scores each completion in batches, without
gradients, rendered as that stage renders its rows."""

from __future__ import annotations

import json
import math
import statistics
from functools import cache
from pathlib import Path
from typing import Literal, get_args

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from incentive.models.loading import load_tokenizer
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch
from incentive.training.reward_model import encode, sequence_scores

Normalize = Literal["none", "sigmoid", "batch"]


@cache
def _load(folder: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """One copy of each reward model per process, frozen, loaded on first use (recipe checks stay fast)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(folder)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_reward_model_folder(path: Path) -> None:
    """Refuse, before any model loads, a folder that is no one-output sequence classifier."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(
            f"path '{path}' is no Hugging Face model folder (no config.json); give the reward_model folder "
            "of a run with a reward_model stage, or another sequence classifier with one output"
        )
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        held = ", ".join(architectures) or "model"
        raise ValueError(f"path '{path}' holds a {held}, not a sequence classifier")
    outputs = len(config.get("id2label") or {"0": ""})
    if outputs != 1:
        raise ValueError(f"path '{path}' holds a classifier with {outputs} outputs; a reward model has one")


@REWARDS.register("reward_model")
class RewardModel(Reward):
    """The reward model's score of the example's prompt (the user turn) and the completion (the assistant
    turn). ``normalize``: ``sigmoid`` maps a score s to σ(s) in (0, 1) (under Bradley–Terry, the chance of being
    preferred to a response scored 0); ``batch`` standardises the batch's scores (mean 0, std 1), so that its
    weight against other parts does not hang on the model's scale; either way the extra ``raw`` logs the score.
    A completion whose rendering exceeds the model's context fails, with that reason."""

    def __init__(self, path: str, batch_size: int = 16, normalize: Normalize = "none") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if normalize not in get_args(Normalize):
            raise ValueError(f"normalize must be one of {get_args(Normalize)}, got {normalize!r}")
        self.path = Path(path).expanduser()
        check_reward_model_folder(self.path)
        self.batch_size = batch_size
        self.normalize = normalize

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        model, tokenizer = _load(str(self.path))
        context = getattr(model.config, "max_position_embeddings", None)
        ids = [encode(tokenizer, c.example.prompt, c.text) for c in batch]
        raw = [math.nan] * len(batch)
        reasons: list[str | None] = [None] * len(batch)
        todo = []
        for i, row in enumerate(ids):
            if context is not None and len(row) > context:
                reasons[i] = f"{len(row)} tokens with the prompt: over the reward model's context ({context})"
            else:
                todo.append(i)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            with torch.no_grad():
                scores = sequence_scores(model, [ids[i] for i in chunk], model.config.pad_token_id)
            for i, score in zip(chunk, scores.tolist(), strict=True):
                raw[i] = score
        if self.normalize == "none":
            return RewardResult(raw, reasons)
        return RewardResult(self._normalized(raw), reasons, {"raw": raw})

    def _normalized(self, raw: list[float]) -> list[float]:
        if self.normalize == "sigmoid":
            return [0.5 * (1 + math.tanh(s / 2)) if math.isfinite(s) else s for s in raw]
        finite = [s for s in raw if math.isfinite(s)]
        if not finite:
            return raw
        mean, std = statistics.fmean(finite), statistics.pstdev(finite)
        return [(s - mean) / std if std > 0 else s - mean for s in raw]
