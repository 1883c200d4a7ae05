"""The temporal graph encoder, RE-GCN in small: per day an R-GCN over that day's facts, a GRU carrying entity
embeddings from day to day, a DistMult decoder, trained by link prediction; and the query-subgraph pooling
g = mean over {query} ∪ history of [E_s; R_r; E_o]. A frozen random table stands in for it in the ablation."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from incentive.geter.events import Quad, TemporalGraph

Edges = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One day's facts as (subject, relation, object) id tensors, inverse facts included (relation + R)."""


def day_edges(graph: TemporalGraph, t: int) -> Edges:
    """Day ``t``'s facts and their inverses (o, r + R, s), so messages flow both ways."""
    facts = graph.on_day(t)
    n = len(graph.relations)
    s = [f.s for f in facts] + [f.o for f in facts]
    r = [f.r for f in facts] + [f.r + n for f in facts]
    o = [f.o for f in facts] + [f.s for f in facts]
    return torch.tensor(s, dtype=torch.long), torch.tensor(r, dtype=torch.long), torch.tensor(o, dtype=torch.long)


class RelationalLayer(nn.Module):
    """One R-GCN layer in RE-GCN's form: h'_o = ReLU(mean over facts (s, r, o) of W_n (h_s + r) + W_s h_o)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.neighbour = nn.Linear(dim, dim, bias=False)
        self.self_loop = nn.Linear(dim, dim, bias=False)

    def forward(self, h: torch.Tensor, relations: torch.Tensor, edges: Edges) -> torch.Tensor:
        s, r, o = edges
        messages = self.neighbour(h[s] + relations[r])
        total = torch.zeros_like(h).index_add(0, o, messages)
        degree = torch.zeros(h.shape[0]).index_add(0, o, torch.ones(len(o))).clamp(min=1)
        return F.relu(total / degree[:, None] + self.self_loop(h))


class TemporalEncoder(nn.Module):
    """Entity embeddings evolved over the last ``history`` days (R-GCN, then a GRU cell from the day before);
    static relation embeddings (inverse relations have their own rows)."""

    def __init__(self, entities: int, relations: int, dim: int, layers: int, history: int) -> None:
        super().__init__()
        self.history = history
        self.entity = nn.Parameter(torch.randn(entities, dim) / dim**0.5)
        self.relation = nn.Parameter(torch.randn(2 * relations, dim) / dim**0.5)
        self.layers = nn.ModuleList(RelationalLayer(dim) for _ in range(layers))
        self.gru = nn.GRUCell(dim, dim)

    def evolve(self, days: Sequence[Edges]) -> torch.Tensor:
        """Entity embeddings after the given days' snapshots, oldest first: (entities, dim)."""
        h = self.entity
        for edges in days:
            x = h
            for layer in self.layers:
                x = layer(x, self.relation, edges)
            h = self.gru(x, h)
        return h

    def before(self, edges: Sequence[Edges], t: int) -> torch.Tensor:
        """Entity embeddings as of day ``t``: evolved over the ``history`` days before it."""
        return self.evolve(edges[max(0, t - self.history) : t])

    def scores(self, h: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """DistMult logits of every entity as the object of (s, r, ?): (len(s), entities)."""
        return (h[s] * self.relation[r]) @ h.T


class GraphEmbedder:
    """Entity embeddings as of a day, the graph's edges cached per day; with ``encoder`` None, a frozen random
    table of the same shapes (the ablation: any structure a trained encoder adds is gone). Read it only once the
    encoder is trained: each day's embeddings are computed once and kept."""

    def __init__(self, graph: TemporalGraph, encoder: TemporalEncoder | None, dim: int, seed: int) -> None:
        self.graph = graph
        self.encoder = encoder
        self.edges = [day_edges(graph, t) for t in range(graph.timestamps)]
        generator = torch.Generator().manual_seed(seed)
        self.random_entity = torch.randn(len(graph.entities), dim, generator=generator) / dim**0.5
        self.random_relation = torch.randn(len(graph.relations), dim, generator=generator) / dim**0.5
        self.days: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def entities_before(self, t: int) -> torch.Tensor:
        """(entities, dim): evolved over the ``history`` days before day ``t`` (the random table: any day)."""
        if self.encoder is None:
            return self.random_entity
        if t not in self.days:
            self.days[t] = self.encoder.before(self.edges, t)
        return self.days[t]

    def relations(self) -> torch.Tensor:
        if self.encoder is None:
            return self.random_relation
        return self.encoder.relation[: len(self.graph.relations)]

    @torch.no_grad()
    def pooled(self, query: Quad, history: Sequence[Quad]) -> torch.Tensor:
        """g ∈ R^{3d}: the mean of [E_s; R_r; E_o] over the query and its history facts, with entity embeddings
        as of the query's day (the day index itself is not pooled)."""
        return pool(self.entities_before(query.t), self.relations(), [query, *history])


def pool(entities: torch.Tensor, relations: torch.Tensor, quads: Sequence[Quad]) -> torch.Tensor:
    """mean over ``quads`` of the concatenation [E_s; R_r; E_o]: (3d,)."""
    s = torch.tensor([q.s for q in quads])
    r = torch.tensor([q.r for q in quads])
    o = torch.tensor([q.o for q in quads])
    return torch.cat([entities[s], relations[r], entities[o]], dim=-1).mean(0)


def link_prediction_loss(encoder: TemporalEncoder, edges: Sequence[Edges], t: int) -> torch.Tensor:
    """Cross-entropy of each true object of day ``t``'s facts (and of the subject, through the inverse facts),
    with entity embeddings evolved over the days before ``t``."""
    s, r, o = edges[t]
    return F.cross_entropy(encoder.scores(encoder.before(edges, t), s, r), o)


def train_encoder(
    encoder: TemporalEncoder,
    edges: Sequence[Edges],
    days: range,
    steps: int,
    lr: float,
    per_step: int,
    seed: int,
    report: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Adam on the link-prediction loss of ``per_step`` random training days per step; the loss per step."""
    rng = random.Random(seed)
    usable = [t for t in days if t > 0 and len(edges[t][0])]
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = torch.stack(
            [link_prediction_loss(encoder, edges, t) for t in rng.sample(usable, min(per_step, len(usable)))]
        ).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if report is not None:
            report(step, losses[-1])
    return losses


@torch.no_grad()
def mean_reciprocal_rank(encoder: TemporalEncoder, edges: Sequence[Edges], days: range) -> float:
    """Raw MRR of the true object among all entities, over the facts of ``days`` (inverse facts included)."""
    ranks = []
    for t in days:
        s, r, o = edges[t]
        if not len(s):
            continue
        scores = encoder.scores(encoder.before(edges, t), s, r)
        true = scores.gather(1, o[:, None])
        ranks.append((scores > true).sum(1) + 1)
    return float((1.0 / torch.cat(ranks).float()).mean()) if ranks else 0.0
