"""Rollouts through Hugging Face ``generate``: G samples per prompt, with explicit group ids and logprobs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from incentive.data.example import Example
from incentive.engines.base import Engine, SamplingParams
from incentive.rollout.types import Completion


class HFEngine(Engine):
    """Rollouts through transformers' ``generate``."""

    def _chunk(
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
            min_new_tokens=params.min_new_tokens or None,
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
