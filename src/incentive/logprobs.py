"""Teacher-forced log-probabilities of target tokens after a context, batched with little padding.

Used by the trainer (forward and backward, :func:`backward_target_logprobs`) for policy logprobs of completions,
and by rewards (without gradient) to score references, e.g. NOVER's reasoning perplexity. Sequences are sorted
by length and packed into micro-batches under a token budget, so padding stays small; targets that continue a
shared context run packed end to end where the model allows (:mod:`incentive.models.packed_body`), in length
buckets otherwise. Gradient-free scoring also finds contexts that differ but share a long prefix (NOVER's
prompt + each completion's own reasoning) and runs that prefix once (:func:`shared_prefixes`). Results come back
in input order.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from incentive.grad_in_place import gradients_in_place
from incentive.lm_head import FusedHead, LogitsHead, head_for, target_logprobs_from_hidden
from incentive.models.packed_body import PackedBody, PackedRows, recomputes_layers

if TYPE_CHECKING:
    from incentive.engines.prefilled import Prefill, PrefilledPrompts

# One more forward pass costs about this many padded tokens: on the benchmark workload (16 completions of
# 8-64 tokens) 64 cut a forward+backward from 4.2 s to 3.3 s; 16 and 256 were slower.
BUCKET_OVERHEAD_TOKENS = 64
# Target tokens (padded) of one training bucket at most: its activations are ~1.6 MB per token for the embedded
# model, so 256 keeps a pass under ~0.4 GB.
TRAINING_BUCKET_TOKENS = 256
# Target tokens of one packed training pass at most (no padding is computed there; see
# :mod:`incentive.models.packed_body`): the benchmark's 16 completions of <= 64 tokens run as one pass, 17 %
# faster than in buckets of <= 256 padded tokens (LoRA update), for +0.06 GB (full) / +0.25 GB (LoRA) peak RSS.
PACKED_TRAINING_TOKENS = 1024
# One more attention group of a packed pass (a separate SDPA call per layer) costs about this many padded slots.
ATTENTION_GROUP_OVERHEAD = 16
# Contexts sharing at least this many leading tokens run them once when scored without gradient (a rendered
# chat prompt is longer); shorter common prefixes are not worth an attention group of their own.
MIN_SHARED_PREFIX = 16


def plan_batches(
    contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], max_tokens: int
) -> list[list[int]]:
    """Split row indices into micro-batches whose padded cost stays under ``max_tokens``.

    Rows sharing a context stay together (their context is computed once); longer groups go first so padding
    stays small. A chunk costs (distinct contexts × longest context) + (rows × longest target).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, ctx in enumerate(contexts):
        groups.setdefault(tuple(ctx), []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: -(len(kv[0]) + max(len(targets[i]) for i in kv[1])))
    batches: list[list[int]] = []
    current: list[int] = []
    ctx_len = tgt_len = n_ctx = 0
    for ctx, rows in ordered:
        for i in rows:
            fresh = not current or tuple(contexts[current[-1]]) != ctx
            c_len, t_len, n_c = max(ctx_len, len(ctx)), max(tgt_len, len(targets[i])), n_ctx + fresh
            if current and n_c * c_len + (len(current) + 1) * t_len > max_tokens:
                batches.append(current)
                current = []
                c_len, t_len, n_c = len(ctx), len(targets[i]), 1
            current.append(i)
            ctx_len, tgt_len, n_ctx = c_len, t_len, n_c
    if current:
        batches.append(current)
    return batches


def forward_target_logprobs(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    indices: Sequence[int],
    temperature: float = 1.0,
    scored: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Logprob of each target token of ``indices`` given everything before it (with ``scored``: of only the
    last ``scored[i]`` tokens of target i, the rest being context that runs without being scored).

    When several rows share a context (the G completions of a prompt), the context runs once and its KV cache
    is shared by the rows, which run packed or in length buckets (gradient flows through it); otherwise each
    row runs whole, in one forward.
    """
    for i in indices:
        if targets[i] and not contexts[i]:
            raise ValueError("a target needs at least one context token before it")
    unique = {tuple(contexts[i]) for i in indices}
    if scored is not None or len(unique) < len(indices):
        return _shared_context_logprobs(model, contexts, targets, indices, temperature, scored)
    return _whole_row_logprobs(model, contexts, targets, indices, temperature)


def left_padded(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and position ids for left-padded rows."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, seq in enumerate(rows):
        ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _whole_row_logprobs(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    indices: Sequence[int],
    temperature: float,
) -> list[torch.Tensor]:
    """Rows left-padded so every target ends at the last position; the head runs only on the last
    ``max target + 1`` positions, which for a 49k vocabulary is most of the cost of short completions."""
    head = head_for(model)
    ids, mask, positions = left_padded([list(contexts[i]) + list(targets[i]) for i in indices])
    keep = max(len(targets[i]) for i in indices) + 1
    _, states = head.run(keep, input_ids=ids, attention_mask=mask, position_ids=positions)
    tokens = torch.zeros(len(indices), keep - 1, dtype=torch.long)
    on = torch.zeros(len(indices), keep - 1, dtype=torch.long)
    for row, i in enumerate(indices):
        if targets[i]:
            tokens[row, keep - 1 - len(targets[i]) :] = torch.tensor(list(targets[i]), dtype=torch.long)
            on[row, keep - 1 - len(targets[i]) :] = 1
    logp = head.logprobs(states[:, :-1], tokens, on, temperature)
    return [logp[row, keep - 1 - len(targets[i]) :] for row, i in enumerate(indices)]


def _shared_context_logprobs(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    indices: Sequence[int],
    temperature: float,
    scored: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Each distinct context once (left-padded, KV cached), then the targets on the cache: packed in one pass
    where the model allows, else right-padded in buckets of similar length so little padding is computed (see
    :func:`length_buckets`). For training, :func:`backward_target_logprobs` keeps less alive at a time."""
    head = head_for(model)
    context = _SharedContext(head, contexts, indices, packed=_packed_body(model, head))
    result: list[torch.Tensor] = [torch.empty(0)] * len(indices)
    for group in context.passes([len(targets[i]) for i in indices], None):
        rows = [indices[k] for k in group]
        logps = context.target_logprobs(head, rows, targets, temperature, scored)
        for k, logp in zip(group, logps, strict=True):
            result[k] = logp
    return result


def _packed_body(model: PreTrainedModel, head: LogitsHead | FusedHead) -> PackedBody | None:
    return PackedBody.for_model(model) if isinstance(head, FusedHead) else None


def backward_target_logprobs(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    indices: Sequence[int],
    loss_of: Callable[[list[int], list[torch.Tensor]], torch.Tensor],
    temperature: float = 1.0,
    prefilled: PrefilledPrompts | None = None,
) -> float:
    """Forward and backward pass of a loss on the logprobs of ``indices``' targets; returns the summed loss.

    ``loss_of(rows, logprobs)`` gives the loss of some of the rows (their indices and per-token logprobs). Rows
    that share a context run on the context's KV cache in passes (packed, up to ``PACKED_TRAINING_TOKENS``
    targets, or length buckets of up to ``TRAINING_BUCKET_TOKENS`` padded ones), each pass's backward before the
    next one's forward, so only one pass's activations are alive at a time. The context runs first without
    gradient; the gradient reaching its KV cache is summed over the passes in a fixed order, and at the end it
    goes back through the context: where targets run packed, the context's layers run again one at a time from
    the inputs its first run recorded, each layer's backward before the next one down
    (:meth:`incentive.models.packed_body.PackedBody.backward_contexts`: one layer's activations alive), else
    the context runs again with gradient (one more forward, all its activations alive). The vocabulary-sized
    weight gradients go straight into ``.grad`` (:mod:`incentive.grad_in_place`). The context's first run is
    taken from ``prefilled`` where that holds it for the current weights (the engine's prefill before
    sampling, which records the layer inputs too). Rows whose contexts all differ run as whole rows in one
    pass, unless the model recomputes its layers (:func:`incentive.models.packed_body.recompute_layers`): then
    they too run in passes, to bound memory.
    """
    with gradients_in_place():
        return _backward_target_logprobs(model, contexts, targets, indices, loss_of, temperature, prefilled)


def _backward_target_logprobs(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    indices: Sequence[int],
    loss_of: Callable[[list[int], list[torch.Tensor]], torch.Tensor],
    temperature: float,
    prefilled: PrefilledPrompts | None,
) -> float:
    unique = {tuple(contexts[i]) for i in indices}
    if len(unique) == len(indices) and not recomputes_layers(model):
        logps = _whole_row_logprobs(model, contexts, targets, indices, temperature)
        loss = loss_of(list(indices), logps)
        loss.backward()
        return float(loss.detach())
    head = head_for(model)
    take = None
    if prefilled is not None and isinstance(head, FusedHead):
        take = functools.partial(prefilled.take, model)
    packed = _packed_body(model, head)
    with torch.no_grad():
        context = _SharedContext(head, contexts, indices, take, packed, record=packed is not None)
    leaves = [*_cache_tensors(context.cache), context.last]
    for leaf in leaves:
        leaf.requires_grad_(True)
    total = 0.0
    cap = TRAINING_BUCKET_TOKENS if packed is None else PACKED_TRAINING_TOKENS
    for group in context.passes([len(targets[i]) for i in indices], cap):
        rows = [indices[k] for k in group]
        loss = loss_of(rows, context.target_logprobs(head, rows, targets, temperature))
        loss.backward()
        total += float(loss.detach())
    if packed is not None and context.inputs:
        kv_grads = [(keys.grad, values.grad) for keys, values in _cache_kv(context.cache)]
        packed.backward_contexts(
            head.embed, list(context.order), context.mask, context.inputs, kv_grads, context.last.grad
        )
        return total
    again = _SharedContext(head, contexts, indices)
    sent = [
        (source, leaf.grad)
        for source, leaf in zip([*_cache_tensors(again.cache), again.last], leaves, strict=True)
        if leaf.grad is not None and source.requires_grad
    ]
    if sent:
        torch.autograd.backward([s for s, _ in sent], [g for _, g in sent])
    return total


class _SharedContext:
    """The distinct contexts of some rows, run once (left-padded) with their KV cache kept for the targets."""

    def __init__(
        self,
        head: LogitsHead | FusedHead,
        contexts: Sequence[Sequence[int]],
        indices: Sequence[int],
        take: Callable[[list[tuple[int, ...]]], Prefill | None] | None = None,
        packed: PackedBody | None = None,
        record: bool = False,
    ) -> None:
        """``take`` may give the contexts' cache and last states as they would be computed here (see
        :meth:`incentive.engines.prefilled.PrefilledPrompts.take`), in which case they are not run. With
        ``packed``, targets run packed (:mod:`incentive.models.packed_body`), else right-padded; with
        ``record`` too, ``inputs`` holds each layer's input hidden states (from the run, or from ``take``
        where it kept them) for :meth:`~incentive.models.packed_body.PackedBody.backward_contexts`."""
        order: dict[tuple[int, ...], int] = {}
        for i in indices:
            order.setdefault(tuple(contexts[i]), len(order))
        self.contexts = contexts
        self.order = order
        self.packed = packed
        ids, self.mask, positions = left_padded(list(order))
        kept = take(list(order)) if take is not None else None
        recording = packed is not None and record
        if kept is not None:
            self.cache, self.last, inputs = kept
        else:
            with packed.recording_inputs() if recording else contextlib.nullcontext([]) as inputs:
                self.cache, self.last = head.run(
                    1, input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True
                )
        self.inputs: list[torch.Tensor] = inputs if recording else []

    def passes(self, lengths: Sequence[int], max_tokens: int | None) -> list[list[int]]:
        """Positions of ``lengths`` (target lengths) grouped into passes of at most ``max_tokens`` target
        tokens (a longer row alone): packed passes fill up in order of length; padded ones are length
        buckets (:func:`length_buckets`), where ``max_tokens`` counts padding too."""
        if self.packed is None:
            return length_buckets(lengths, max_tokens=max_tokens)
        passes: list[list[int]] = []
        tokens = 0
        for k in sorted(range(len(lengths)), key=lambda k: lengths[k]):
            if not passes or (max_tokens is not None and tokens + lengths[k] > max_tokens):
                passes.append([])
                tokens = 0
            passes[-1].append(k)
            tokens += lengths[k]
        return passes

    def target_logprobs(
        self,
        head: LogitsHead | FusedHead,
        rows: Sequence[int],
        targets: Sequence[Sequence[int]],
        temperature: float,
        scored: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Per-token logprobs of each of ``rows``' targets on the contexts' cache and last states (which stay as
        they are, for the next rows). ``scored`` (the last tokens of each target to score) needs the packed
        path, which :func:`target_logprobs` checks before it splits contexts."""
        if self.packed is not None and isinstance(head, FusedHead) and any(targets[i] for i in rows):
            return self._packed_logprobs(head, self.packed, rows, targets, temperature, scored)
        logp = self._padded_logprobs(head, rows, targets, temperature)
        return [logp[row, : len(targets[i])] for row, i in enumerate(rows)]

    def _packed_logprobs(
        self,
        head: FusedHead,
        packed: PackedBody,
        rows: Sequence[int],
        targets: Sequence[Sequence[int]],
        temperature: float,
        scored: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Targets laid end to end (empty ones left out); a token's state is the one before it in its row, or
        its context's last state for a row's first token. With ``scored``, the head runs on each row's last
        ``scored[i]`` tokens only."""
        nonempty = [row for row, i in enumerate(rows) if targets[i]]
        groups = length_buckets([len(targets[rows[r]]) for r in nonempty], overhead=ATTENTION_GROUP_OVERHEAD)
        kept = [nonempty[k] for group in groups for k in group]  # laid out group by group
        picked = [rows[row] for row in kept]
        owner = [self.order[tuple(self.contexts[i])] for i in picked]
        layout = PackedRows.build(
            [targets[i] for i in picked],
            [len(self.contexts[i]) for i in picked],
            owner,
            self.mask,
            [len(group) for group in groups],
        )
        hidden = packed(head.embed(layout.ids), layout, _cache_kv(self.cache))
        firsts = torch.tensor([0, *layout.lengths[:-1]]).cumsum(0)
        before = torch.arange(len(layout.ids)) - 1
        before[firsts] = len(layout.ids) + torch.arange(len(picked))
        ids, lengths = layout.ids, layout.lengths
        if scored is not None:
            lengths = [scored[i] for i in picked]
            tails = [
                torch.arange(first + length - count, first + length)
                for first, length, count in zip(firsts.tolist(), layout.lengths, lengths, strict=True)
            ]
            pick = torch.cat(tails)
            before, ids = before.index_select(0, pick), ids.index_select(0, pick)
        lasts = self.last[:, -1].index_select(0, torch.tensor(owner))
        steps = torch.cat([hidden, lasts]).index_select(0, before)
        logp = target_logprobs_from_hidden(steps, head.weight, ids, temperature, head.onednn)
        result = [logp.new_zeros(0) for _ in rows]
        for row, part in zip(kept, logp.split(lengths), strict=True):
            result[row] = part
        return result

    def _padded_logprobs(
        self,
        head: LogitsHead | FusedHead,
        rows: Sequence[int],
        targets: Sequence[Sequence[int]],
        temperature: float,
    ) -> torch.Tensor:
        """[rows, longest target] logprobs of ``rows``' targets, right-padded (0 past each end). Rows pick their
        context with ``index_select``: the backward pass of ``t[owner]`` adds the rows sharing a context with
        atomic float adds on several threads, in a different order each time (300 backward passes gave 103
        different gradients); ``index_select``'s adds them in a fixed order."""
        owner = torch.tensor([self.order[tuple(self.contexts[i])] for i in rows])
        width = max(max(len(targets[i]) for i in rows), 1)
        tgt_ids = torch.zeros(len(rows), width, dtype=torch.long)
        tgt_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for row, i in enumerate(rows):
            tgt_ids[row, : len(targets[i])] = torch.tensor(list(targets[i]), dtype=torch.long)
            tgt_mask[row, : len(targets[i])] = 1
        lengths = torch.tensor([len(self.contexts[i]) for i in rows])
        _, states = head.run(
            0,
            input_ids=tgt_ids,
            attention_mask=torch.cat([self.mask[owner], tgt_mask], dim=1),
            position_ids=lengths[:, None] + torch.arange(width)[None, :],
            cache=_map_cache(self.cache, lambda t: t.index_select(0, owner)),
            use_cache=True,
        )
        steps = torch.cat([self.last.index_select(0, owner)[:, -1:], states[:, :-1]], dim=1)
        return head.logprobs(steps, tgt_ids, tgt_mask, temperature)


def _map_cache(cache: Cache, pick: Callable[[torch.Tensor], torch.Tensor]) -> Cache:
    """A cache whose keys and values are ``pick`` of those of ``cache`` (which stays as it is, for the next
    bucket); gradient flows back through ``pick``."""
    mapped = copy.copy(cache)
    mapped.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in mapped.layers:
        layer.keys, layer.values = pick(layer.keys), pick(layer.values)
    return mapped


def _cache_tensors(cache: Cache) -> list[torch.Tensor]:
    """Keys and values of every layer of ``cache``, in a fixed order."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _cache_kv(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of ``cache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def length_buckets(
    lengths: Sequence[int], overhead: int = BUCKET_OVERHEAD_TOKENS, max_tokens: int | None = None
) -> list[list[int]]:
    """Positions of ``lengths`` split into runs of sorted length that minimise padded tokens plus ``overhead``
    tokens per run (the price of one more, smaller forward pass); exact, by dynamic programming. With
    ``max_tokens``, no run of several rows pads to more tokens than that (it bounds a pass's activations)."""
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    best = [0] + [math.inf] * len(order)
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for first in range(end):
            if max_tokens is not None and end - first > 1 and (end - first) * longest > max_tokens:
                continue
            cost = best[first] + (end - first) * longest + overhead
            if cost < best[end]:
                best[end], start[end] = cost, first
    buckets: list[list[int]] = []
    end = len(order)
    while end > 0:
        buckets.append(order[start[end] : end])
        end = start[end]
    return buckets[::-1]


def target_logprobs(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    max_tokens: int = 4096,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Per-token logprobs of every target after its context, in input order; grad flows if enabled.

    Without gradient, on a model the packed body serves, contexts that differ but share a long prefix (see
    :func:`shared_prefixes`) run it once: the rest of each context goes with its target, unscored.
    """
    if len(contexts) != len(targets):
        raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
    scored: list[int] | None = None
    if not torch.is_grad_enabled() and _packed_body(model, head_for(model)) is not None:
        prefixes = shared_prefixes(contexts)
        if any(n < len(c) for n, c in zip(prefixes, contexts, strict=True)):
            scored = [len(t) for t in targets]
            targets = [list(c[n:]) + list(t) for c, n, t in zip(contexts, prefixes, targets, strict=True)]
            contexts = [c[:n] for c, n in zip(contexts, prefixes, strict=True)]
    results: list[torch.Tensor | None] = [None] * len(contexts)
    for batch in plan_batches(contexts, targets, max_tokens):
        logps = forward_target_logprobs(model, contexts, targets, batch, temperature, scored)
        for i, lp in zip(batch, logps, strict=True):
            results[i] = lp
    return [r for r in results if r is not None]


def shared_prefixes(contexts: Sequence[Sequence[int]], overhead: int = MIN_SHARED_PREFIX) -> list[int]:
    """For each context, how many leading tokens to run once for its cluster.

    Contexts are sorted, and cut into runs of neighbours (clusters) so that the tokens saved, (size - 1) x the
    cluster's common prefix less ``overhead`` per cluster, are the most (dynamic programming over the cuts). So
    the G contexts of one prompt share the whole prompt rather than all contexts sharing only the system
    prompt. A context alone keeps all of its tokens (nothing shared, nothing split).
    """
    order = sorted(range(len(contexts)), key=lambda i: tuple(contexts[i]))
    overlaps = [_common_prefix(contexts[a], contexts[b]) for a, b in itertools.pairwise(order)]
    saved = [0] * (len(order) + 1)  # saved[j]: the most saved over the first j sorted contexts
    cut = list(range(len(order) + 1))  # cut[j]: where the last cluster of that best split starts
    for end in range(1, len(order) + 1):
        saved[end], cut[end] = saved[end - 1], end - 1
        common = math.inf
        for start in range(end - 2, -1, -1):
            common = min(common, overlaps[start])
            if common == 0:
                break  # nothing shared from here down: no longer cluster can save more
            gain = saved[start] + (end - start - 1) * common - overhead
            if gain > saved[end]:
                saved[end], cut[end] = int(gain), start
    prefixes = [len(c) for c in contexts]
    end = len(order)
    while end > 0:
        start = cut[end]
        if end - start > 1:
            common = min(overlaps[start : end - 1])
            for k in order[start:end]:
                prefixes[k] = common
        end = start
    return prefixes


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
