"""One run of the hinted controller: rollouts through the hint pipeline (source → semantic cache → stability
anchor), multi-critic PPO updates, a metrics line per update and a final evaluation with the policy's mean action."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from incentive.control.anchor import KnowledgeBase, StabilityAnchor
from incentive.control.cache import SemanticCache
from incentive.control.config import COMPONENTS, ControlRecipe
from incentive.control.envs import ENVIRONMENTS, ControlEnv, Transition
from incentive.control.hints import Hint, simplex
from incentive.control.policy import ActorCritic, log_prob, mean_action
from incentive.control.ppo import Batch, combined_advantage, gae, update
from incentive.control.rewards import reward_components
from incentive.control.scene import Scene
from incentive.control.sources import HINT_SOURCES, HintSource
from incentive.control.state import augment, hint_size


def episode_seed(seed: int, episode: int) -> int:
    """The layout seed of an episode: distinct across runs and episodes, the same on every rerun."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


@dataclass
class Episode:
    """Running totals of the current episode."""

    previous: np.ndarray = field(default_factory=lambda: np.zeros(2))
    steps: int = 0
    speed: float = 0.0
    returns: np.ndarray = field(default_factory=lambda: np.zeros(len(COMPONENTS)))
    crashed: bool = False
    hints: set[Hint] = field(default_factory=set)

    def record(self, step: Transition, rewards: np.ndarray, action: np.ndarray, hint: Hint | None) -> None:
        self.previous = action
        self.steps += 1
        self.speed += step.speed
        self.returns += rewards
        self.crashed |= step.crashed
        if hint is not None:
            self.hints.add(hint)


def summarise(episodes: list[dict[str, Any]], counts: Counter[str]) -> dict[str, Any]:
    """Success, collision and off-road rates, mean speed over steps, mean component returns, and per-step rates
    of hint calls, cache hits and fallbacks."""
    steps = max(counts["steps"], 1)
    out: dict[str, Any] = {
        "episodes": len(episodes),
        "hint_call_rate": counts["calls"] / steps,
        "cache_hit_rate": counts["hits"] / steps,
        "fallback_rate": counts["fallbacks"] / steps,
    }
    if episodes:
        total = sum(e["steps"] for e in episodes)
        out |= {
            "success_rate": float(np.mean([e["success"] for e in episodes])),
            "collision_rate": float(np.mean([e["collision"] for e in episodes])),
            "offroad_rate": float(np.mean([e["offroad"] for e in episodes])),
            "mean_speed": sum(e["speed_sum"] for e in episodes) / max(total, 1),
            "episode_length": total / len(episodes),
            **{f"return_{n}": float(np.mean([e["returns"][k] for e in episodes])) for k, n in enumerate(COMPONENTS)},
        }
    return out


class Controller:
    """The environment, the hint pipeline and the actor-critic of one run; ``env`` and ``source`` may be given
    (tests), else they are built from the recipe by name."""

    def __init__(
        self, recipe: ControlRecipe, env: ControlEnv | None = None, source: HintSource | None = None
    ) -> None:
        self.recipe = recipe
        seed = recipe.run.seed
        torch.manual_seed(seed)
        self.env = env or ENVIRONMENTS.get(recipe.env.name)(recipe.env)
        self.source = source or HINT_SOURCES.get(recipe.hints.source)(recipe.hints, seed)
        self.agents = recipe.hints.agents
        self.base = KnowledgeBase(recipe.anchor.capacity)
        self.anchor = StabilityAnchor(recipe.anchor, self.base)
        context = self._retrieved if recipe.anchor.rag else None
        self.cache = SemanticCache(recipe.cache, self.source, self.agents, context)
        self.fallback = np.asarray(simplex(recipe.hints.fallback_weights))
        self.model = ActorCritic(
            self.env.observation_size + hint_size(self.agents),
            recipe.ppo.hidden,
            components=len(COMPONENTS),
            init_concentration=recipe.ppo.init_concentration,
        )
        self._anchored: tuple[Hint, np.ndarray] | None = None

    def _retrieved(self, hint: Hint | None) -> str:
        return self.anchor.context(hint.scenario if hint else None)

    def weights(self, hint: Hint | None) -> np.ndarray:
        """The critic weights for a step: the fallback without a hint, else the hint's, anchored (once per hint)."""
        if hint is None:
            return self.fallback
        if not self.recipe.anchor.enabled:
            return np.asarray(hint.weights)
        if self._anchored is None or self._anchored[0] is not hint:
            self._anchored = (hint, np.asarray(self.anchor(hint).weights))
        return self._anchored[1]

    def observe(self, raw: np.ndarray, t: int, scene: Scene) -> tuple[np.ndarray, Hint | None, np.ndarray]:
        """(augmented state, hint, critic weights) for the episode's control step ``t``."""
        hint = self.cache.serve(t, scene).hint
        return augment(raw, hint, self.agents), hint, self.weights(hint)

    def advance(
        self, episode: Episode, action: np.ndarray, hint: Hint | None
    ) -> tuple[Transition, Scene, np.ndarray]:
        """Apply ``action``, score its reward components and add the step to ``episode``."""
        step = self.env.step(action)
        scene = self.env.scene()
        rewards = reward_components(step, scene, action, episode.previous, self.recipe.rewards)
        episode.record(step, rewards, action, hint)
        return step, scene, rewards

    def finish(self, episode: Episode, last: Transition, learn: bool) -> dict[str, Any]:
        """An episode's summary; when ``learn``, a successful one with good enough efficiency adds its hints'
        scenarios and weights to the knowledge base. A success reaches the time limit without a crash, on the
        road, at a mean forward speed of at least ``env.success_min_speed``."""
        fast_enough = episode.speed >= self.recipe.env.success_min_speed * episode.steps
        success = last.truncated and not episode.crashed and not last.offroad and fast_enough
        efficiency = episode.returns[1] / max(episode.steps, 1)
        if learn and success and efficiency >= self.recipe.anchor.min_return and self.recipe.anchor.enabled:
            for hint in sorted(episode.hints, key=repr):
                self.base.add(hint.scenario, hint.weights)
        return {
            "success": success,
            "collision": episode.crashed,
            "offroad": last.offroad,
            "steps": episode.steps,
            "speed_sum": episode.speed,
            "returns": episode.returns.tolist(),
        }

    def start(self, seed: int) -> tuple[np.ndarray, Hint | None, np.ndarray]:
        """Reset the environment and the cache for a new episode; its first (state, hint, weights)."""
        raw = self.env.reset(seed)
        self.cache.reset()
        return self.observe(raw, 0, self.env.scene())

    def evaluate(self, episodes: int, seed: int) -> dict[str, Any]:
        """``episodes`` episodes with the mean action (the knowledge base is read, not grown)."""
        before = Counter(self.cache.counts)
        done = []
        for i in range(episodes):
            state, hint, _ = self.start(episode_seed(seed, i))
            episode = Episode()
            while True:
                with torch.no_grad():
                    action = mean_action(self.model.distribution(torch.as_tensor(state))).numpy()
                step, scene, _ = self.advance(episode, action, hint)
                if step.terminated or step.truncated:
                    done.append(self.finish(episode, step, learn=False))
                    break
                state, hint, _ = self.observe(step.observation, episode.steps, scene)
        counts = Counter(self.cache.counts)
        counts.subtract(before)
        return summarise(done, counts)


class Rollout:
    """Steps of training carried across PPO updates: the current episode and its next (state, hint, weights)."""

    def __init__(self, c: Controller) -> None:
        self.c = c
        self.seed = c.recipe.run.seed
        self.episodes = 0
        self.state, self.hint, self.weights = c.start(episode_seed(self.seed, 0))
        self.episode = Episode()

    def value(self, state: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.c.model.values(torch.as_tensor(state)).numpy()

    def collect(self, steps: int) -> tuple[Batch, np.ndarray, list[dict[str, Any]]]:
        """``steps`` control steps with sampled actions: the PPO batch (per-critic GAE mixed by each step's
        weights), the weights used, and the summaries of the episodes that ended."""
        c = self.c
        states, actions, logps, rows, values, nexts, ends, weights = [], [], [], [], [], [], [], []
        finished = []
        for _ in range(steps):
            with torch.no_grad():
                dist = c.model.distribution(torch.as_tensor(self.state))
                action = (2.0 * dist.sample() - 1.0).clamp(-1.0, 1.0)
                logps.append(log_prob(dist, action).item())
            a = action.numpy()
            step, scene, reward = c.advance(self.episode, a, self.hint)
            states.append(self.state)
            actions.append(a)
            rows.append(reward)
            values.append(self.value(self.state))
            weights.append(self.weights)
            ends.append(step.terminated or step.truncated)
            if ends[-1]:
                cut = step.truncated and not step.terminated
                final = augment(step.observation, self.hint, c.agents)
                nexts.append(self.value(final) if cut else np.zeros(len(COMPONENTS)))
                finished.append(c.finish(self.episode, step, learn=True))
                self.episodes += 1
                self.state, self.hint, self.weights = c.start(episode_seed(self.seed, self.episodes))
                self.episode = Episode()
            else:
                self.state, self.hint, self.weights = c.observe(step.observation, self.episode.steps, scene)
                nexts.append(None)
        values.append(self.value(self.state))
        after = np.stack([v if v is not None else values[i + 1] for i, v in enumerate(nexts)])
        cfg = c.recipe.ppo
        advantages, returns = gae(np.stack(rows), np.stack(values[:-1]), after, np.array(ends), cfg.gamma, cfg.lam)
        used = np.stack(weights)
        mixed = combined_advantage(advantages, used, cfg.normalize)
        batch = Batch(
            torch.as_tensor(np.stack(states)),
            torch.as_tensor(np.stack(actions)),
            torch.tensor(logps),
            torch.as_tensor(mixed, dtype=torch.float32),
            torch.as_tensor(returns, dtype=torch.float32),
        )
        return batch, used, finished


def train(
    recipe: ControlRecipe,
    run_dir: Path,
    log: Callable[[str], None] = print,
    controller: Controller | None = None,
) -> dict[str, Any]:
    """Train for ppo.total_steps (whole rollouts, at least one), then evaluate; writes metrics.jsonl, eval.json,
    policy.pt and kb.json into ``run_dir`` and returns the evaluation's metrics."""
    c = controller or Controller(recipe)
    cfg = recipe.ppo
    optimizer = torch.optim.Adam(c.model.parameters(), lr=cfg.lr)
    updates = max(cfg.total_steps // cfg.rollout_steps, 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rollout = Rollout(c)
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as metrics:
        for number in range(1, updates + 1):
            before = Counter(c.cache.counts)
            batch, weights, finished = rollout.collect(cfg.rollout_steps)
            stats = update(c.model, optimizer, batch, cfg)
            counts = Counter(c.cache.counts)
            counts.subtract(before)
            line = {
                "update": number,
                "steps": number * cfg.rollout_steps,
                "episodes_total": rollout.episodes,
                **summarise(finished, counts),
                **stats,
                "mean_weights": weights.mean(0).round(4).tolist(),
                "kb_size": len(c.base),
                "elapsed_s": round(time.perf_counter() - started, 2),
            }
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
            log(progress_line(line, updates))
        log(f"[control] evaluating {recipe.eval.episodes} episodes")
        result = c.evaluate(recipe.eval.episodes, recipe.eval.seed)
        result |= {"source": {**c.source.counts}, "anchor": {**c.anchor.counts}, "kb_size": len(c.base)}
        metrics.write(json.dumps({"event": "eval", **result}) + "\n")
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (run_dir / "kb.json").write_text(json.dumps(c.base.to_json()) + "\n")
    torch.save(c.model.state_dict(), run_dir / "policy.pt")
    c.env.close()
    return result


def progress_line(line: dict[str, Any], updates: int) -> str:
    """One update's line: rollout outcome and hint traffic."""

    def pct(key: str) -> str:
        return f"{line[key]:5.1%}" if key in line else "  n/a"

    speed = f"{line['mean_speed']:5.1f} m/s" if "mean_speed" in line else "  n/a"
    return (
        f"[control] update {line['update']}/{updates}  steps {line['steps']}  episodes {line['episodes']}  "
        f"success {pct('success_rate')}  collisions {pct('collision_rate')}  speed {speed}  "
        f"hint calls {pct('hint_call_rate')}  cache hits {pct('cache_hit_rate')}"
    )
