"""The semantic cache: the hint source is asked every ``query_period`` control steps, the latest hint is served in
between until its TTL runs out, and (optionally) a stored hint of a similar past scene is reused instead of asking."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from incentive.control.anchor import cosine
from incentive.control.config import CacheConfig
from incentive.control.hints import Hint, HintSource
from incentive.control.scene import Scene, embedding


@dataclass(frozen=True)
class Served:
    """The hint for one control step (None: the fallback, validity 0) and where it came from: ``call`` (the
    source was asked this step), ``cache`` (a hint still within its TTL), ``reuse`` (a similar scene's) or
    ``fallback``."""

    hint: Hint | None
    origin: str

    @property
    def valid(self) -> bool:
        return self.hint is not None


class SemanticCache:
    """Bridges a slow hint source and per-step control; ``counts`` has calls, hits (cache or reuse), reuses
    and fallbacks per served step, and ``steps``."""

    def __init__(
        self,
        config: CacheConfig,
        source: HintSource,
        agents: int,
        context: Callable[[Hint | None], str] | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.agents = agents
        self.context = context
        self.store: OrderedDict[int, tuple[np.ndarray, Hint]] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self._next_id = 0
        self.reset()

    def reset(self) -> None:
        """A new episode: no current hint, and the next step queries."""
        self.current: Hint | None = None
        self.made_at = 0
        self.last_query: int | None = None

    def serve(self, t: int, scene: Scene) -> Served:
        """The hint for the episode's control step ``t``; a source that gives no hints is never asked."""
        self.counts["steps"] += 1
        if not self.source.informative:
            self.counts["fallbacks"] += 1
            return Served(None, "fallback")
        origin = "cache"
        if self.last_query is None or t - self.last_query >= self.config.query_period:
            self.last_query = t
            origin = self._refresh(t, scene)
        if self.current is None or t - self.made_at >= self.config.ttl:
            self.counts["fallbacks"] += 1
            return Served(None, "fallback")
        self.counts["hits"] += origin in ("cache", "reuse")
        return Served(self.current, origin)

    def _refresh(self, t: int, scene: Scene) -> str:
        """Replace the current hint by a reused or a fresh one; a source with no answer keeps the old hint."""
        key = np.asarray(embedding(scene, self.agents))
        if self.config.reuse_similarity is not None:
            match = self._similar(key)
            if match is not None:
                self.counts["reuses"] += 1
                self.current, self.made_at = match, t
                return "reuse"
        self.counts["calls"] += 1
        hint = self.source.hint(scene, self.context(self.current) if self.context else "")
        if hint is not None:
            self.current, self.made_at = hint, t
            self._remember(key, hint)
        return "call"

    def _similar(self, key: np.ndarray) -> Hint | None:
        """The stored hint whose scene is most similar to ``key``, if at least reuse_similarity."""
        best, found = -np.inf, None
        for entry_id, (stored, hint) in self.store.items():
            sim = cosine(stored, key)
            if sim > best:
                best, found = sim, (entry_id, hint)
        if found is None or best < (self.config.reuse_similarity or 0.0):
            return None
        self.store.move_to_end(found[0])
        return found[1]

    def _remember(self, key: np.ndarray, hint: Hint) -> None:
        if self.config.reuse_similarity is None:
            return
        self.store[self._next_id] = (key, hint)
        self._next_id += 1
        while len(self.store) > self.config.size:
            self.store.popitem(last=False)
