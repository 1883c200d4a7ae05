"""Rollouts through Hugging Face ``generate``: G samples per prompt, with explicit group ids and logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.data.example import Example
from incentive.rollout.types import Completion, RolloutBatch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; temperature 0 means greedy."""

    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0


class HFEngine:
    """Generates with the live policy. Logprobs are of the sampled tokens at the sampling temperature."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(model, tokenizer)

    @torch.no_grad()
    def generate(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
    ) -> RolloutBatch:
        """``params.n`` completions for each prompt; completion k of prompt i carries ``group_ids[i]``."""
        completions: list[Completion] = []
        per_call = max(1, self.batch_size // params.n)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), per_call):
                stop = start + per_call
                completions += self._generate_chunk(
                    examples[start:stop], prompts[start:stop], group_ids[start:stop], params
                )
        finally:
            self.model.train(was_training)
        return RolloutBatch(completions)

    def _generate_chunk(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
    ) -> list[Completion]:
        tok = self.tokenizer
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        greedy = params.temperature == 0
        out = self.model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None,
            num_return_sequences=params.n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=self.stop_ids,
            return_dict_in_generate=True,
            output_logits=True,
        )
        width = enc.input_ids.shape[1]
        new_tokens = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).float()
        if not greedy:
            logits = logits / params.temperature
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens[..., None]).squeeze(-1)
        result: list[Completion] = []
        for row in range(new_tokens.shape[0]):
            i = row // params.n
            ids = new_tokens[row].tolist()
            end = next((k + 1 for k, t in enumerate(ids) if t in self.stop_ids), None)
            truncated = end is None
            ids = ids[: end or len(ids)]
            prompt_ids = enc.input_ids[i][enc.attention_mask[i].bool()].tolist()
            result.append(
                Completion(
                    group_id=group_ids[i],
                    example=examples[i],
                    prompt_text=prompts[i],
                    prompt_ids=prompt_ids,
                    completion_ids=ids,
                    text=tok.decode(ids, skip_special_tokens=True),
                    logprobs=token_logprobs[row, : len(ids)].tolist(),
                    truncated=truncated,
                )
            )
        return result


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id
    stops = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return sorted(stops)
