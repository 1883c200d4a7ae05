"""Rollouts through Hugging Face ``generate``: G samples per prompt, with explicit group ids and logprobs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from incentive.data.example import Example
from incentive.engines.base import Engine, SamplingParams
from incentive.rollout.types import Completion


class HFEngine(Engine):
    """Rollouts through transformers' ``generate``. A forced prefix joins the prompt's tokens as input; its
    logprobs come from one extra forward pass over the batch (only when some prompt has one)."""

    forced_prefixes = True

    def _chunk(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
        prefixes: Sequence[str] | None = None,
    ) -> list[Completion]:
        tok = self.tokenizer
        prompt_ids = [self.encode(p) for p in prompts]
        forced = self.prefix_ids(prefixes, params) if prefixes is not None else [[] for _ in prompts]
        shortest = min(len(f) for f in forced)
        ids, mask = self._left_padded([p + f for p, f in zip(prompt_ids, forced, strict=True)])
        greedy = params.temperature == 0
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=params.max_new_tokens - shortest,
            min_new_tokens=max(0, params.min_new_tokens - shortest) or None,
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
        width = ids.shape[1]
        new_tokens = out.sequences[:, width:]
        scale = 1.0 if greedy else params.temperature
        token_logprobs = torch.stack(
            [
                torch.log_softmax(step.float() / scale, dim=-1).gather(-1, new_tokens[:, k, None]).squeeze(-1)
                for k, step in enumerate(out.logits)
            ],
            dim=1,
        )
        forced_logprobs = self._forced_logprobs(ids, mask, forced, params) if any(forced) else None
        result: list[Completion] = []
        for row in range(new_tokens.shape[0]):
            i = row // params.n
            sampled = new_tokens[row].tolist()[: params.max_new_tokens - len(forced[i])]
            end = next((k + 1 for k, t in enumerate(sampled) if t in self.stop_ids), None)
            truncated = end is None
            sampled = sampled[: end or len(sampled)]
            completion_ids = forced[i] + sampled
            logprobs = token_logprobs[row, : len(sampled)].tolist()
            result.append(
                Completion(
                    group_id=group_ids[i],
                    example=examples[i],
                    prompt_text=prompts[i],
                    prompt_ids=prompt_ids[i],
                    completion_ids=completion_ids,
                    text=tok.decode(completion_ids, skip_special_tokens=True),
                    logprobs=(forced_logprobs[i] if forced_logprobs else []) + logprobs,
                    truncated=truncated,
                )
            )
        return result

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows left-padded with the pad token, and their attention mask, as ``generate`` wants them."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[k, width - len(r) :] = 1
        return ids, mask

    def _forced_logprobs(
        self, ids: torch.Tensor, mask: torch.Tensor, forced: list[list[int]], params: SamplingParams
    ) -> list[list[float]]:
        """Each row's forced tokens' logprobs at the sampling temperature (greedy: at 1), from one forward pass
        that keeps logits only for the last positions, where the prefixes sit."""
        keep = max(len(f) for f in forced) + 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
        ).logits
        logp = torch.log_softmax(logits.float() / (params.temperature or 1.0), dim=-1)
        out = []
        for row, f in enumerate(forced):
            first = keep - 1 - len(f)
            steps = logp[row, first : keep - 1]
            out.append(steps.gather(-1, torch.tensor(f, dtype=torch.long)[:, None]).squeeze(-1).tolist())
        return out
