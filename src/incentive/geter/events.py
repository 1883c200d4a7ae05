"""A seeded synthetic temporal knowledge graph: fictional countries, relations, daily events, and rules by which a
premise event (A negotiates with B on day t) brings a consequence (A signs an agreement with B on day t + lag)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from incentive.geter.config import GraphConfig


@dataclass(frozen=True)
class Relation:
    """A relation's wording: ``base`` after "will" ("sign an agreement with"), ``past`` in facts."""

    base: str
    past: str


@dataclass(frozen=True)
class RuleWording:
    """A premise relation, the consequence it brings, and the days between them."""

    premise: Relation
    consequence: Relation
    lag: int


RULES = (
    RuleWording(
        Relation("negotiate with", "negotiated with"),
        Relation("sign an agreement with", "signed an agreement with"),
        2,
    ),
    RuleWording(Relation("threaten", "threatened"), Relation("impose sanctions on", "imposed sanctions on"), 3),
    RuleWording(
        Relation("host a visit by", "hosted a visit by"), Relation("promise aid to", "promised aid to"), 1
    ),
    RuleWording(Relation("accuse", "accused"), Relation("protest against", "protested against"), 2),
    RuleWording(
        Relation("request help from", "requested help from"), Relation("receive aid from", "received aid from"), 3
    ),
    RuleWording(Relation("mobilize troops near", "mobilized troops near"), Relation("fight", "fought"), 2),
)
"""Every rule the generator knows; a graph uses the first ``rules``."""

NOISE = (
    Relation("consult", "consulted"),
    Relation("praise", "praised"),
    Relation("criticize", "criticized"),
    Relation("meet with", "met with"),
)
"""Relations of spontaneous events that no rule involves; a graph uses the first ``noise_relations``."""

ONSETS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def entity_name(index: int) -> str:
    """A distinct pronounceable name per index below 4900: two of 70 syllables, then "ria" (Bakeria)."""
    syllable = [onset + vowel for vowel in VOWELS for onset in ONSETS]
    return (syllable[index % 70] + syllable[(7 * (index % 70) + index // 70) % 70] + "ria").capitalize()


class Quad(NamedTuple):
    """A fact: subject, relation, object (ids) and day."""

    s: int
    r: int
    o: int
    t: int


@dataclass(frozen=True)
class Rule:
    """A rule by relation ids: ``premise`` on day t brings ``consequence`` on day t + ``lag``."""

    premise: int
    consequence: int
    lag: int


@dataclass(frozen=True)
class TemporalGraph:
    """Entities, relations, rules and every event, sorted by day."""

    entities: tuple[str, ...]
    relations: tuple[Relation, ...]
    rules: tuple[Rule, ...]
    events: tuple[Quad, ...]
    timestamps: int

    def rule_for(self, consequence: int) -> Rule:
        """The rule whose consequence is the relation ``consequence``."""
        return next(rule for rule in self.rules if rule.consequence == consequence)

    def on_day(self, t: int) -> list[Quad]:
        return [e for e in self.events if e.t == t]

    def fact(self, quad: Quad) -> str:
        """``Day 5: Bakelia negotiated with Dorenia.``"""
        return f"Day {quad.t}: {self.entities[quad.s]} {self.relations[quad.r].past} {self.entities[quad.o]}."


def generate_graph(cfg: GraphConfig) -> TemporalGraph:
    """Each day ``events_per_step`` spontaneous events (a premise or noise relation between two distinct
    entities); a premise event on day t adds its consequence on day t + lag with ``rule_probability``."""
    rng = random.Random(cfg.seed)
    wordings = RULES[: cfg.rules]
    relations = tuple(r for w in wordings for r in (w.premise, w.consequence)) + NOISE[: cfg.noise_relations]
    rules = tuple(Rule(2 * i, 2 * i + 1, w.lag) for i, w in enumerate(wordings))
    spontaneous = [rule.premise for rule in rules] + list(range(2 * len(rules), len(relations)))
    by_premise = {rule.premise: rule for rule in rules}
    events: set[Quad] = set()
    for t in range(cfg.timestamps):
        for _ in range(cfg.events_per_step):
            s, o = rng.sample(range(cfg.entities), 2)
            r = rng.choice(spontaneous)
            events.add(Quad(s, r, o, t))
            rule = by_premise.get(r)
            if rule is not None and rng.random() < cfg.rule_probability and t + rule.lag < cfg.timestamps:
                events.add(Quad(s, rule.consequence, o, t + rule.lag))
    names = tuple(entity_name(i) for i in range(cfg.entities))
    return TemporalGraph(names, relations, rules, tuple(sorted(events, key=lambda e: (e.t, e))), cfg.timestamps)
