"""What every rollout engine shares: sampling settings, chunking prompts into batches, stop tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.data.example import Example
from incentive.engines.merged import merged_lora
from incentive.engines.prefilled import PrefilledPrompts
from incentive.rollout.types import Completion, RolloutBatch

if TYPE_CHECKING:
    from incentive.config import GenerationConfig


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; temperature 0 means greedy."""

    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0
    """No end token is drawn before this many new tokens (stop tokens are left out of the draw; reported
    logprobs stay those of the model's own distribution)."""


class Engine(ABC):
    """Generates with the live policy; logprobs are of the sampled tokens at the sampling temperature."""

    forced_prefixes: ClassVar[bool] = False
    """Whether ``generate`` takes ``prefixes``: an engine that sets it accepts them in ``_chunk``."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.prefilled = PrefilledPrompts(model)
        """Prompt prefills the engine keeps for the update on the same weights (the cached engine fills it)."""

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        generation: GenerationConfig,
    ) -> Engine:
        """The engine a recipe's ``generation`` section asks for; an engine with settings of its own (vLLM)
        takes them from there."""
        return cls(model, tokenizer, batch_size)

    def weights_changed(self) -> None:  # noqa: B027  (a hook; most engines have nothing to refresh)
        """The trainer calls this after each optimizer step that changed the policy. Engines that sample from
        the live model (hf, cached) see the new weights anyway, so this does nothing; an engine that holds its
        own copy of the weights (vLLM) refreshes it before its next ``generate``."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added (prompts already carry their chat markup)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prefix_ids(self, prefixes: Sequence[str], params: SamplingParams) -> list[list[int]]:
        """Each forced prefix's token ids; a prefix must leave room for at least one sampled token, since it counts
        against ``max_new_tokens`` as if the policy had written it."""
        out = [self.encode(p) if p else [] for p in prefixes]
        longest = max((len(ids) for ids in out), default=0)
        if longest >= params.max_new_tokens:
            raise ValueError(
                f"a forced prefix of {longest} tokens leaves no room within max_new_tokens {params.max_new_tokens}"
            )
        return out

    @torch.no_grad()
    def generate(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
        prefixes: Sequence[str] | None = None,
    ) -> RolloutBatch:
        """``params.n`` completions for each prompt; completion k of prompt i carries ``group_ids[i]``. With
        ``prefixes``, each completion of prompt i starts with the tokens of ``prefixes[i]``, forced after the
        prompt's tokens and kept in the completion as if sampled. A LoRA policy samples with its adapter merged
        into copies of the weights (see :func:`merged_lora`)."""
        if prefixes is not None and not self.forced_prefixes:
            raise ValueError(f"the {type(self).__name__} cannot force assistant prefixes")
        completions: list[Completion] = []
        per_call = max(1, self.batch_size // params.n)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.prefilled.sampling(), merged_lora(self.model):
                for start in range(0, len(prompts), per_call):
                    stop = start + per_call
                    forced = {} if prefixes is None else {"prefixes": prefixes[start:stop]}
                    completions += self._chunk(
                        examples[start:stop], prompts[start:stop], group_ids[start:stop], params, **forced
                    )
        finally:
            self.model.train(was_training)
        return RolloutBatch(completions)

    @abstractmethod
    def _chunk(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
    ) -> list[Completion]:
        """All completions of a batch of prompts that fits ``batch_size`` sequences."""


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids = model.generation_config.eos_token_id
    stops = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return sorted(stops)
