"""Multi-turn rollouts on the environment protocol: every active episode decodes its next turn together with
the others (the cached engine's decode loop), the environment answers each finished turn, and its observation
joins the context with loss mask 0 while step rewards land on tokens of the turn."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from incentive.data.example import Example
from incentive.engines.base import Engine, SamplingParams
from incentive.engines.cached import CachedEngine, Turn
from incentive.rollout.environment import Environment, PolicyTurn, StepResult
from incentive.rollout.types import Completion


@dataclass
class Episode:
    """One rollout in progress: everything after the prompt, its loss mask and step rewards, and how it ended
    (``ended_by`` empty while it runs)."""

    prompt_ids: list[int]
    env: Environment | None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    step_rewards: dict[int, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    generated: int = 0
    turns: int = 0
    ended_by: str = ""
    truncated: bool = False
    failure: str = ""

    def add(self, ids: list[int], logprobs: list[float], trained: bool) -> None:
        self.ids += ids
        self.logprobs += logprobs
        self.mask += [1.0 if trained else 0.0] * len(ids)
        if trained:
            self.generated += len(ids)


class EnvironmentEngine(Engine):
    """Wraps a :class:`CachedEngine`. ``generation.max_new_tokens`` bounds the tokens the policy writes per
    episode (observations do not count; a forced prefix does); ``max_turns`` bounds its turns, ``max_turn_tokens``
    each turn's tokens, and an observation that would take the whole sequence to ``max_context_tokens`` ends the
    episode instead (``ended_by: context``). An environment that raises fails its episode only: the completion
    keeps what was written so far and ``info["failure"]`` says why, which the reward pipeline counts as a failed
    sample."""

    forced_prefixes = True

    def __init__(
        self,
        inner: CachedEngine,
        make: Callable[[], Environment],
        name: str = "environment",
        max_turns: int | None = None,
        max_turn_tokens: int | None = None,
        max_context_tokens: int | None = None,
    ) -> None:
        super().__init__(inner.model, inner.tokenizer, inner.batch_size)
        self.inner = inner
        self.make = make
        self.name = name
        self.max_turns = max_turns
        self.max_turn_tokens = max_turn_tokens
        self.max_context_tokens = max_context_tokens
        self.stop_text = make().stop_text

    def weights_changed(self) -> None:
        self.inner.weights_changed()

    def _chunk(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
        prefixes: Sequence[str] | None = None,
    ) -> list[Completion]:
        prompt_ids = [self.encode(p) for p in prompts]
        owner = [k for k in range(len(prompts)) for _ in range(params.n)]
        episodes = [self._start(prompt_ids[k], examples[k]) for k in owner]
        forced = self.prefix_ids(prefixes, params) if prefixes is not None else [[] for _ in prompts]
        first: dict[str, Any] = {"stop_text": self.stop_text}
        if (
            self.max_turn_tokens is not None
        ):  # a forced prefix is never cut: the turn limit counts from its end
            first["limits"] = [
                min(len(forced[k]) + self.max_turn_tokens, params.max_new_tokens) for k in owner
            ]
        if prefixes is not None:
            first["forced"] = forced
        turns = self.inner.decode(prompt_ids, params, **first)
        active = [i for i, e in enumerate(episodes) if not e.ended_by]
        turns = [turns[i] for i in active]
        while active:
            active = [
                i
                for i, turn in zip(active, turns, strict=True)
                if self._after_turn(episodes[i], turn, params)
            ]
            if active:
                contexts = [episodes[i].prompt_ids + episodes[i].ids for i in active]
                limits = [self._turn_limit(episodes[i], params) for i in active]
                one = SamplingParams(1, max(limits), params.temperature, params.top_p)
                turns = self.inner.decode(contexts, one, limits, self.stop_text)
        return [
            self._completion(e, examples[k], prompts[k], group_ids[k])
            for e, k in zip(episodes, owner, strict=True)
        ]

    def _start(self, prompt_ids: list[int], example: Example) -> Episode:
        """A new episode with its environment reset; one that fails to start has already ended."""
        episode = Episode(prompt_ids, None)
        try:
            episode.env = self.make()
            episode.env.reset(example, self.tokenizer)
        except Exception as err:  # a broken environment fails its episode, not the run
            self._fail(episode, "reset", err)
        return episode

    def _turn_limit(self, episode: Episode, params: SamplingParams) -> int:
        left = params.max_new_tokens - episode.generated
        return left if self.max_turn_tokens is None else min(left, self.max_turn_tokens)

    def _after_turn(self, episode: Episode, turn: Turn, params: SamplingParams) -> bool:
        """Record a turn and hand it to the environment. True when the episode goes on."""
        start = len(episode.ids)
        episode.add(turn.tokens, turn.logprobs, trained=True)
        budget_spent = turn.ended_by == "length" and episode.generated >= params.max_new_tokens
        ended_by = "turn_limit" if turn.ended_by == "length" and not budget_spent else turn.ended_by
        view = PolicyTurn(
            episode.turns,
            list(turn.tokens),
            self.tokenizer.decode(turn.tokens, skip_special_tokens=True),
            self.tokenizer.decode(episode.ids, skip_special_tokens=True),
            ended_by,
        )
        episode.turns += 1
        try:
            assert episode.env is not None
            result = episode.env.step(view)
            if not isinstance(result, StepResult) or not isinstance(result.observation, str):
                raise TypeError(f"step returned {result!r}, expected a StepResult with a text observation")
            self._place_rewards(episode, result, start, len(turn.tokens))
            episode.info.update(result.info)
        except Exception as err:  # a broken environment fails its episode, not the run
            self._fail(episode, "step", err)
            return False
        if budget_spent:
            return self._end(episode, "length")
        if result.done or result.truncated:
            episode.truncated = result.truncated
            return self._end(episode, result.reason or ("truncated" if result.truncated else ended_by))
        if self.max_turns is not None and episode.turns >= self.max_turns:
            return self._end(episode, "max_turns")
        ids = self.encode(result.observation)
        context = len(episode.prompt_ids) + len(episode.ids) + len(ids)
        if self.max_context_tokens is not None and context >= self.max_context_tokens:
            return self._end(episode, "context")
        episode.add(ids, [0.0] * len(ids), trained=False)
        if episode.generated >= params.max_new_tokens:
            return self._end(episode, "length")
        return True

    @staticmethod
    def _place_rewards(episode: Episode, result: StepResult, start: int, length: int) -> None:
        """Step rewards keyed by token of the turn (negative from its end) → keyed by token of the completion."""
        for index, reward in result.rewards.items():
            if not -length <= index < length:
                raise IndexError(f"step reward on token {index} of a {length}-token turn")
            at = start + index % length
            episode.step_rewards[at] = episode.step_rewards.get(at, 0.0) + float(reward)

    @staticmethod
    def _end(episode: Episode, reason: str) -> bool:
        episode.ended_by = reason
        return False

    def _fail(self, episode: Episode, stage: str, err: Exception) -> None:
        episode.failure = f"environment '{self.name}' raised {type(err).__name__} in {stage}: {err}"
        episode.ended_by = "error"

    def _completion(self, episode: Episode, example: Example, prompt: str, group_id: int) -> Completion:
        info: dict[str, Any] = {**episode.info, "ended_by": episode.ended_by, "turns": episode.turns}
        if episode.failure:
            info["failure"] = episode.failure
        return Completion(
            group_id=group_id,
            example=example,
            prompt_text=prompt,
            prompt_ids=episode.prompt_ids,
            completion_ids=episode.ids,
            text=self.tokenizer.decode(episode.ids, skip_special_tokens=True),
            logprobs=episode.logprobs,
            truncated=episode.ended_by == "length" or episode.truncated,
            loss_mask=episode.mask,
            info=info,
            step_rewards=episode.step_rewards,
        )
