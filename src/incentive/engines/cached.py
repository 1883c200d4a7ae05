"""A decode loop of our own: each prompt is prefilled once and its KV cache shared by its G samples, finished
rows leave the batch, and there is no per-step ``generate`` machinery. Greedy output equals HF ``generate``."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.data.example import Example
from incentive.engines.base import Engine, SamplingParams
from incentive.engines.decode_step import DecodeStep
from incentive.engines.kv import preallocate
from incentive.engines.low_precision import LowPrecisionCopy
from incentive.kernels import build
from incentive.logprobs import left_padded
from incentive.models.packed_body import PackedBody
from incentive.rollout.types import Completion

if TYPE_CHECKING:
    from incentive.config import GenerationConfig


def sample(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their logprobs (at the sampling temperature, before top-p) from [rows, vocab] logits.
    Without top-p, one kernel call (``kernels/sampling.cpp``) where the kernels are built: the same inverse-CDF
    draw from the same uniforms as :func:`inverse_cdf`, in one task per row instead of five sweeps."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    ops = build.ops_for(logits)
    if ops is not None and params.top_p >= 1.0 and logits.dim() == 2:
        return ops.sample_tokens(logits, params.temperature, torch.rand(logits.shape[0], dtype=torch.float64))
    scaled = logits / params.temperature
    logprobs = torch.log_softmax(scaled, -1)
    probs = logprobs.exp()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    tokens = inverse_cdf(probs)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _sample_without(
    excluded: torch.Tensor, logits: torch.Tensor, params: SamplingParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample` with the ``excluded`` tokens left out of the draw; the logprobs are those of the full
    distribution (log(1 - p(excluded)) added back), as HF ``generate`` and vLLM report them."""
    logits = logits.float()
    kept = logits.index_fill(-1, excluded, float("-inf"))
    tokens, logprobs = sample(kept, params)
    scale = params.temperature or 1.0
    return tokens, logprobs + torch.logsumexp(kept / scale, -1) - torch.logsumexp(logits / scale, -1)


def _forced_table(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Forced tokens per row as a [rows, longest] table, -1 past each row's own."""
    width = max((len(r) for r in rows), default=0)
    table = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        table[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return table


def _force(
    wanted: torch.Tensor, logits: torch.Tensor, new: torch.Tensor, lp: torch.Tensor, params: SamplingParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows with a forced token (``wanted`` >= 0) take it, with its logprob at the sampling temperature (greedy:
    at temperature 1, as :func:`sample` reports); the others keep what was sampled. Returns which rows were forced."""
    on = wanted >= 0
    scaled = logits.float() / (params.temperature or 1.0)
    forced_lp = torch.log_softmax(scaled, -1).gather(-1, wanted.clamp(min=0)[:, None]).squeeze(-1)
    return torch.where(on, wanted, new), torch.where(on, forced_lp, lp), on


def inverse_cdf(weights: torch.Tensor) -> torch.Tensor:
    """One draw per row from unnormalised non-negative ``weights``: the first index whose running sum exceeds a
    uniform fraction of the total. One uniform per row instead of ``multinomial``'s exponential per vocabulary
    entry (that was 11% of decode time at a 49k vocabulary); zero-weight entries are never drawn."""
    cdf = weights.double().cumsum(-1)
    target = torch.rand(weights.shape[0], 1, dtype=torch.float64) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens.clamp_(max=weights.shape[-1] - 1)


@dataclass
class Turn:
    """One sampled continuation: its tokens and logprobs, and why it ended (``eos``, ``stop`` text, or
    ``length`` when its token limit ran out)."""

    tokens: list[int]
    logprobs: list[float]
    ended_by: str


class CachedEngine(Engine):
    """Same interface as :class:`HFEngine`; faster on CPU for groups of samples. With ``sampling_dtype``
    bfloat16 it samples from a bf16 copy of the policy (see :mod:`incentive.engines.low_precision`)."""

    forced_prefixes = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
        sampling_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(model, tokenizer, batch_size)
        self.low_precision = LowPrecisionCopy(sampling_dtype) if sampling_dtype != torch.float32 else None

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        generation: GenerationConfig,
    ) -> CachedEngine:
        return cls(model, tokenizer, batch_size, getattr(torch, generation.sampling_dtype))

    def weights_changed(self) -> None:
        """Prompt prefills of the old weights are dropped; a bf16 copy is reloaded before the next rollout."""
        self.prefilled.clear()
        if self.low_precision is not None:
            self.low_precision.mark_stale()

    def _chunk(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
        prefixes: Sequence[str] | None = None,
    ) -> list[Completion]:
        prompt_ids = [self.encode(p) for p in prompts]
        if prefixes is None:
            turns = self.decode(prompt_ids, params)
        else:
            turns = self.decode(prompt_ids, params, forced=self.prefix_ids(prefixes, params))
        return [
            Completion(
                group_id=group_ids[row // params.n],
                example=examples[row // params.n],
                prompt_text=prompts[row // params.n],
                prompt_ids=prompt_ids[row // params.n],
                completion_ids=turn.tokens,
                text=self.tokenizer.decode(turn.tokens, skip_special_tokens=True),
                logprobs=turn.logprobs,
                truncated=turn.ended_by == "length",
            )
            for row, turn in enumerate(turns)
        ]

    @torch.no_grad()
    def decode(
        self,
        contexts: Sequence[list[int]],
        params: SamplingParams,
        limits: Sequence[int] | None = None,
        stop_text: str | None = None,
        forced: Sequence[Sequence[int]] | None = None,
    ) -> list[Turn]:
        """``params.n`` continuations of each token context (row k·n + j is sample j of context k), each prefilled
        once; row r stops at an end token (none before ``params.min_new_tokens``), at ``stop_text`` (kept), or
        after ``limits[r]`` tokens (default ``params.max_new_tokens``). The rows of context k first take the
        tokens ``forced[k]`` as if sampled (their logprobs at the sampling temperature); those never end a row
        but by its limit."""
        model = self.model if self.low_precision is None else self.low_precision.model_for(self.model)
        ids, mask, positions = left_padded(list(contexts))
        step = DecodeStep.for_model(model)
        if step is not None:
            packed = PackedBody.for_model(model) if self.low_precision is None else None
            with packed.recording_inputs() if packed is not None else contextlib.nullcontext([]) as inputs:
                cache, last, logits = step.prefill(ids, mask, positions)
            if self.low_precision is None:
                self.prefilled.put(contexts, cache, last, inputs)
        else:
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            cache, logits = out.cache, out.logits[:, -1]
        owner = torch.arange(len(contexts)).repeat_interleave(params.n)
        limit = list(limits) if limits is not None else [params.max_new_tokens] * len(owner)
        cache = preallocate(cache, owner, max(limit, default=0))
        mask = mask[owner]
        logits = logits[owner]
        next_pos = torch.tensor([len(c) for c in contexts])[owner]
        rows = torch.arange(len(owner))
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        ended = ["length"] * len(owner)
        stops = torch.tensor(self.stop_ids)
        tail = len(stop_text) + 2 if stop_text else 0
        prefix = _forced_table([forced[k] for k in owner.tolist()] if forced else [])
        for position in range(max(limit, default=0)):
            if position < params.min_new_tokens:
                new, lp = _sample_without(stops, logits, params)
            else:
                new, lp = sample(logits, params)
            forcing = position < prefix.shape[1]
            if forcing:
                new, lp, on = _force(prefix[rows, position], logits, new, lp, params)
            done = torch.isin(new, stops)
            if forcing:
                done &= ~on
            for k, (row, token, value) in enumerate(
                zip(rows.tolist(), new.tolist(), lp.tolist(), strict=True)
            ):
                tokens[row].append(token)
                logprobs[row].append(value)
                if done[k]:
                    ended[row] = "eos"
                elif (
                    stop_text
                    and not (forcing and on[k])
                    and stop_text in self.tokenizer.decode(tokens[row][-tail:])
                ):
                    ended[row] = "stop"
                    done[k] = True
                elif len(tokens[row]) >= limit[row]:
                    done[k] = True
            keep = ~done
            if not keep.any():
                break
            if not keep.all():
                cache.batch_select_indices(keep.nonzero().squeeze(-1))
                rows, new, mask, next_pos = rows[keep], new[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            if step is not None:
                logits = step(new, next_pos, mask, cache)
            else:
                logits = model(
                    input_ids=new[:, None],
                    attention_mask=mask,
                    position_ids=next_pos[:, None],
                    cache=cache,
                    use_cache=True,
                ).logits[:, -1]
            next_pos = next_pos + 1
        return [Turn(t, lp, e) for t, lp, e in zip(tokens, logprobs, ended, strict=True)]
