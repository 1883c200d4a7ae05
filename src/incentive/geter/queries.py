"""Queries about the graph, their labels and reference explanations: "is it plausible that A will sign an
agreement with B on day t?" is yes when the history holds the rule's premise (A negotiated with B on day t - lag),
no when it holds the premise with another object, unsure when it holds no premise of A that day."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from incentive.geter.events import Quad, TemporalGraph

Label = Literal["yes", "no", "unsure"]
LABELS: tuple[Label, ...] = ("yes", "no", "unsure")


@dataclass(frozen=True)
class Query:
    """A query fact, its label, the history facts retrieved for it (oldest first) and the reference answer
    (the label, capitalised, then the explanation)."""

    quad: Quad
    label: Label
    history: tuple[Quad, ...]
    answer: str


def premise_objects(facts: Iterable[Quad], graph: TemporalGraph, quad: Quad) -> list[int]:
    """The objects x of the facts (s, premise, x, t - lag) among ``facts``, sorted: the evidence for ``quad``."""
    rule = graph.rule_for(quad.r)
    day = quad.t - rule.lag
    return sorted({f.o for f in facts if f.s == quad.s and f.r == rule.premise and f.t == day})


def decide(objects: Sequence[int], quad: Quad) -> Label:
    """yes when the premise names the query's object, no when it names only others, unsure without premise."""
    if quad.o in objects:
        return "yes"
    return "no" if objects else "unsure"


def label_of(graph: TemporalGraph, quad: Quad) -> Label:
    """The label the whole graph gives ``quad``."""
    return decide(premise_objects(graph.events, graph, quad), quad)


def retrieve(graph: TemporalGraph, quad: Quad, window: int, limit: int) -> tuple[Quad, ...]:
    """Facts of the ``window`` days before the query that involve its subject or object: the premise facts of
    its subject first (the query's own object first among them), then the most recent others, ``limit`` in all,
    returned oldest first."""
    near = [
        f
        for f in graph.events
        if quad.t - window <= f.t < quad.t and ({f.s, f.o} & {quad.s, quad.o})
    ]
    evidence = set(premise_objects(near, graph, quad))
    rule = graph.rule_for(quad.r)

    def rank(f: Quad) -> tuple[int, int, int]:
        is_evidence = f.s == quad.s and f.r == rule.premise and f.t == quad.t - rule.lag and f.o in evidence
        return (0 if is_evidence else 1, 0 if f.o == quad.o else 1, -f.t)

    return tuple(sorted(sorted(near, key=rank)[:limit], key=lambda f: (f.t, f)))


def answer_text(graph: TemporalGraph, quad: Quad, history: Sequence[Quad]) -> tuple[Label, str]:
    """The label the retrieved ``history`` gives, and the templated answer that explains it."""
    objects = premise_objects(history, graph, quad)
    label = decide(objects, quad)
    rule = graph.rule_for(quad.r)
    names, premise, consequence = graph.entities, graph.relations[rule.premise], graph.relations[quad.r]
    s, o, day = names[quad.s], names[quad.o], quad.t - rule.lag
    days = f"{rule.lag} day{'s' if rule.lag > 1 else ''}"
    if label == "yes":
        text = (
            f"Yes. {s} {premise.past} {o} on day {day}, and those who {premise.base} someone usually "
            f"{consequence.base} them {days} later."
        )
    elif label == "no":
        other = names[objects[0]]
        text = (
            f"No. {s} {premise.past} {other} on day {day}, not {o}, so {s} would rather {consequence.base} "
            f"{other} on day {quad.t}."
        )
    else:
        text = (
            f"Unsure. Nothing in the history shows that {s} {premise.past} anyone on day {day}, so there is no "
            "evidence for or against it."
        )
    return label, text


def make_queries(
    graph: TemporalGraph, days: range, count: int, seed: int, window: int, limit: int
) -> list[Query]:
    """About ``count`` queries on ``days``, a third per label: yes from consequences that happened, no from
    those with the object replaced by one the premise does not name, unsure from premise-free days; shuffled."""
    rng = random.Random(seed)
    consequences = {rule.consequence for rule in graph.rules}
    happened = [e for e in graph.events if e.t in days and e.r in consequences]
    if not happened:
        last = days.stop - 1
        raise ValueError(f"no rule consequence happens on days {days.start}-{last}; make the graph larger")
    premises: dict[tuple[int, int, int], set[int]] = defaultdict(set)
    events = set(graph.events)
    for e in graph.events:
        premises[e.s, e.r, e.t].add(e.o)
    wanted = {label: count // 3 + (i < count % 3) for i, label in enumerate(LABELS)}
    found: dict[Label, list[Quad]] = {label: [] for label in LABELS}
    found["yes"] = rng.sample(happened, min(wanted["yes"], len(happened)))
    entities = range(len(graph.entities))
    for _ in range(50 * count):
        if all(len(found[label]) >= wanted[label] for label in LABELS):
            break
        base = rng.choice(happened)
        rule = graph.rule_for(base.r)
        named = premises[base.s, rule.premise, base.t - rule.lag]
        other = rng.choice([x for x in entities if x != base.s and x not in named])
        corrupted = Quad(base.s, base.r, other, base.t)
        taken = corrupted in found["no"] or len(found["no"]) >= wanted["no"]
        if corrupted not in events and not taken:
            found["no"].append(corrupted)
        s, o = rng.sample(entities, 2)
        rule = rng.choice(graph.rules)
        t = rng.choice(days)
        free = Quad(s, rule.consequence, o, t)
        taken = free in found["unsure"] or len(found["unsure"]) >= wanted["unsure"]
        if not premises[s, rule.premise, t - rule.lag] and not taken:
            found["unsure"].append(free)
    queries = []
    for quads in found.values():
        for quad in quads:
            history = retrieve(graph, quad, window, limit)
            label, text = answer_text(graph, quad, history)
            queries.append(Query(quad, label, history, text))
    rng.shuffle(queries)
    return queries
