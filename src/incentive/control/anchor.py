"""The contextual stability anchor: a knowledge base of (scenario, validated weights) pairs, and the rule that
pulls a hint's critic weights toward the weights validated in similar scenarios (or rejects them)."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from incentive.control.config import COMPONENTS, AnchorConfig
from incentive.control.hints import Hint, scenario_onehot, simplex


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity; 0 when either vector is zero."""
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norms if norms > 0 else 0.0


class KnowledgeBase:
    """Validated (scenario key, weights) pairs, the oldest dropped past ``capacity``; keys are the scenario's
    one-hot codes, so cosine similarity is the share of matching scenario categories."""

    def __init__(self, capacity: int) -> None:
        self.entries: deque[tuple[tuple[int, ...], tuple[float, ...]]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, scenario: tuple[int, ...], weights: tuple[float, ...]) -> None:
        self.entries.append((tuple(scenario), tuple(weights)))

    def nearest(self, scenario: tuple[int, ...], m: int) -> list[tuple[float, np.ndarray]]:
        """The ``m`` most similar entries as (similarity, weights), most similar first (ties: newest first)."""
        if not self.entries:
            return []
        query = scenario_onehot(scenario)
        keys = np.stack([scenario_onehot(s) for s, _ in self.entries])
        sims = keys @ query / (np.linalg.norm(keys, axis=1) * np.linalg.norm(query))
        order = sorted(range(len(sims)), key=lambda i: (-sims[i], -i))[:m]
        return [(float(sims[i]), np.asarray(self.entries[i][1])) for i in order]

    def to_json(self) -> list[dict[str, list[float] | list[int]]]:
        return [{"scenario": list(s), "weights": list(w)} for s, w in self.entries]


@dataclass(frozen=True)
class Anchored:
    """Weights after anchoring, what happened (``pass``: no similar entry, ``blend`` or ``reject``), the best
    similarity found (−1: empty base) and the anchor used."""

    weights: tuple[float, float, float]
    status: str
    similarity: float
    anchor: tuple[float, float, float] | None


class StabilityAnchor:
    """w = (1−λ)·w_hint + λ·mean(w_KB) over the top-m entries at least τ_kb similar; with δ set, a hint farther
    than δ (L2) from that mean is replaced by it; with no entry that similar, w_hint passes unchanged."""

    def __init__(self, config: AnchorConfig, base: KnowledgeBase) -> None:
        self.config = config
        self.base = base
        self.counts: Counter[str] = Counter()

    def neighbours(self, scenario: tuple[int, ...]) -> list[tuple[float, np.ndarray]]:
        """The top-m entries at least τ_kb similar to ``scenario``, most similar first."""
        return self.close(self.base.nearest(scenario, self.config.top_m))

    def close(self, found: list[tuple[float, np.ndarray]]) -> list[tuple[float, np.ndarray]]:
        """The entries of a search result that are at least τ_kb similar."""
        return [(s, w) for s, w in found if s >= self.config.threshold]

    def __call__(self, hint: Hint) -> Anchored:
        found = self.base.nearest(hint.scenario, self.config.top_m)
        best = found[0][0] if found else -1.0
        near = self.close(found)
        if not near:
            self.counts["pass"] += 1
            return Anchored(hint.weights, "pass", best, None)
        anchor = simplex(np.mean([w for _, w in near], axis=0))
        distance = float(np.linalg.norm(np.asarray(hint.weights) - np.asarray(anchor)))
        if self.config.reject_distance is not None and distance > self.config.reject_distance:
            self.counts["reject"] += 1
            return Anchored(anchor, "reject", best, anchor)
        lam = self.config.strength
        self.counts["blend"] += 1
        blended = simplex((1 - lam) * np.asarray(hint.weights) + lam * np.asarray(anchor))
        return Anchored(blended, "blend", best, anchor)

    def context(self, scenario: tuple[int, ...] | None) -> str:
        """Retrieved knowledge for a language model's prompt: the validated weights nearest ``scenario``."""
        if scenario is None:
            return ""
        near = self.neighbours(scenario)
        if not near:
            return ""
        lines = ["Weights that worked in similar past scenes:"]
        for sim, w in near:
            lines.append(
                f"- similarity {sim:.2f}: " + ", ".join(f"{n} {x:.2f}" for n, x in zip(COMPONENTS, w, strict=True))
            )
        return "\n".join(lines)
