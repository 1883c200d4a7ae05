"""Runs a strategy's variants on an engine: variants with the same sampling settings go in one ``generate`` call
(prefixes may differ within it), completions come back in plan order with their labels and group ids."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from incentive.data.example import Example
from incentive.engines.base import Engine, SamplingParams
from incentive.rollout.strategy import Variant
from incentive.rollout.types import Completion, RolloutBatch


@dataclasses.dataclass(frozen=True)
class Request:
    """One variant of one example, with the group id it was given and its resolved sampling settings."""

    example: Example
    variant: Variant
    group_id: int
    params: SamplingParams


def resolve(variant: Variant, base: SamplingParams) -> SamplingParams:
    """The variant's sampling settings: its own where set, else the recipe's. A variant may not sample longer
    than the recipe's ``max_new_tokens`` (data was fitted to the context with it, and loss normalisers use it)."""
    max_new = variant.max_new_tokens if variant.max_new_tokens is not None else base.max_new_tokens
    if not 0 < max_new <= base.max_new_tokens:
        raise ValueError(
            f"a variant asks for max_new_tokens {max_new}; it must be in 1..{base.max_new_tokens} "
            "(generation.max_new_tokens)"
        )
    return SamplingParams(
        n=variant.n,
        max_new_tokens=max_new,
        temperature=base.temperature if variant.temperature is None else variant.temperature,
        top_p=base.top_p if variant.top_p is None else variant.top_p,
        min_new_tokens=min(base.min_new_tokens, max_new),
    )


def plan_requests(
    examples: Sequence[Example], plans: Sequence[Sequence[Variant]], first_group: int, base: SamplingParams
) -> tuple[list[Request], int]:
    """Each example's variants as requests; per example, each distinct ``group`` key takes the next group id
    (in order of first appearance). Returns the requests and how many group ids they used."""
    requests: list[Request] = []
    next_id = first_group
    for example, variants in zip(examples, plans, strict=True):
        if sum(v.n for v in variants) < 1:
            raise ValueError(
                f"the rollout strategy planned no samples for example {example.id or example.prompt!r}"
            )
        ids: dict[str, int] = {}
        for variant in variants:
            if variant.n < 0:
                raise ValueError(f"a variant asks for {variant.n} samples")
            if variant.group not in ids:
                ids[variant.group] = next_id
                next_id += 1
            if variant.n:
                requests.append(Request(example, variant, ids[variant.group], resolve(variant, base)))
    return requests, next_id - first_group


def sample_requests(engine: Engine, requests: Sequence[Request]) -> RolloutBatch:
    """All requests' completions, in request order (each request's ``n`` together), labelled. Requests with
    equal sampling settings share one ``generate`` call; ``prefixes`` is passed only where one is forced, so
    an engine that cannot force them still serves every other strategy."""
    buckets: dict[SamplingParams, list[int]] = {}
    for i, request in enumerate(requests):
        buckets.setdefault(request.params, []).append(i)
    out: list[list[Completion]] = [[] for _ in requests]
    for params, members in buckets.items():
        chosen = [requests[i] for i in members]
        prefixes = [r.variant.prefix for r in chosen]
        batch = engine.generate(
            [r.example for r in chosen],
            [r.variant.prompt for r in chosen],
            [r.group_id for r in chosen],
            params,
            **({"prefixes": prefixes} if any(prefixes) else {}),
        )
        if len(batch) != params.n * len(chosen):
            raise RuntimeError(
                f"the engine returned {len(batch)} completions for {params.n * len(chosen)} samples"
            )
        for k, i in enumerate(members):
            own = batch.completions[k * params.n : (k + 1) * params.n]
            for completion in own:
                completion.labels.update(requests[i].variant.labels)
            out[i] = own
    return RolloutBatch([c for own in out for c in own])
