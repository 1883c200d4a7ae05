"""Multi-turn rollouts with tool calls (Pixel Reasoner's loop): a turn that ends with ``</tool_call>`` is
executed and its observation appended to the context, masked from the loss, and generation continues."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from incentive.data.example import Example
from incentive.engines.base import Engine, SamplingParams
from incentive.engines.cached import CachedEngine, Turn
from incentive.rollout.types import Completion
from incentive.tools import CallProtocol, Tool, observe


@dataclass
class Episode:
    """One rollout in progress: everything after the prompt, and what its tool calls did."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    generated: int = 0
    calls: int = 0
    executed: int = 0
    errors: list[str] = field(default_factory=list)
    final_error: bool = False
    ended_by: str = ""

    def add(self, ids: list[int], logprobs: list[float], trained: bool) -> None:
        self.ids += ids
        self.logprobs += logprobs
        self.mask += [1.0 if trained else 0.0] * len(ids)
        if trained:
            self.generated += len(ids)


class ToolEngine(Engine):
    """Wraps a :class:`CachedEngine`: ``max_new_tokens`` bounds the tokens the policy writes per rollout; calls
    1…``max_calls`` execute and a further call ends the episode (the release's counter rule), as does a turn
    without a call or a context over ``max_context_tokens``. Tool errors come back as ``Execution error: …``;
    ``final_tool_error`` marks a rollout whose last executed call failed."""

    def __init__(
        self,
        inner: CachedEngine,
        tools: dict[str, Tool],
        protocol: CallProtocol,
        max_calls: int = 4,
        max_observation_tokens: int = 256,
        max_context_tokens: int | None = None,
    ) -> None:
        super().__init__(inner.model, inner.tokenizer, inner.batch_size)
        self.inner = inner
        self.tools = tools
        self.protocol = protocol
        self.max_calls = max_calls
        self.max_observation_tokens = max_observation_tokens
        self.max_context_tokens = max_context_tokens

    def _chunk(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
    ) -> list[Completion]:
        prompt_ids = [self.encode(p) for p in prompts]
        owner = [k for k in range(len(prompts)) for _ in range(params.n)]
        episodes = [Episode(prompt_ids[k]) for k in owner]
        turns = self.inner.decode(prompt_ids, params, stop_text=self.protocol.close)
        active = list(range(len(episodes)))
        while active:
            active = [
                i
                for i, turn in zip(active, turns, strict=True)
                if self._after_turn(episodes[i], turn, examples[owner[i]], params)
            ]
            if active:
                contexts = [episodes[i].prompt_ids + episodes[i].ids for i in active]
                limits = [params.max_new_tokens - episodes[i].generated for i in active]
                one = SamplingParams(1, max(limits), params.temperature, params.top_p)
                turns = self.inner.decode(contexts, one, limits, self.protocol.close)
        return [
            self._completion(e, examples[k], prompts[k], group_ids[k])
            for e, k in zip(episodes, owner, strict=True)
        ]

    def _after_turn(self, episode: Episode, turn: Turn, example: Example, params: SamplingParams) -> bool:
        """Record a turn; execute its call if it made one. True when the episode goes on."""
        episode.add(turn.tokens, turn.logprobs, trained=True)
        if turn.ended_by != "stop":
            episode.ended_by = turn.ended_by
            return False
        episode.calls += 1
        if episode.executed >= self.max_calls:
            episode.ended_by = "max_calls"
            return False
        observation = self._execute(episode, example)
        ids = self.encode(self.protocol.response(observation))
        context = len(episode.prompt_ids) + len(episode.ids) + len(ids)
        if self.max_context_tokens is not None and context >= self.max_context_tokens:
            episode.ended_by = "context"
            return False
        episode.add(ids, [0.0] * len(ids), trained=False)
        if episode.generated >= params.max_new_tokens:
            episode.ended_by = "length"
            return False
        return True

    def _execute(self, episode: Episode, example: Example) -> str:
        episode.executed += 1
        text = self.tokenizer.decode(episode.ids, skip_special_tokens=True)
        observation, failed = observe(self.tools, text, self.protocol, example)
        episode.final_error = failed
        if failed:
            episode.errors.append(observation)
        ids = self.encode(observation)
        if len(ids) > self.max_observation_tokens:
            observation = self.tokenizer.decode(ids[: self.max_observation_tokens]) + " …(cut)"
        return observation

    def _completion(self, episode: Episode, example: Example, prompt: str, group_id: int) -> Completion:
        return Completion(
            group_id=group_id,
            example=example,
            prompt_text=prompt,
            prompt_ids=episode.prompt_ids,
            completion_ids=episode.ids,
            text=self.tokenizer.decode(episode.ids, skip_special_tokens=True),
            logprobs=episode.logprobs,
            truncated=episode.ended_by == "length",
            loss_mask=episode.mask,
            info={
                "tool_calls": episode.calls,
                "tool_executed": episode.executed,
                "tool_errors": episode.errors,
                "final_tool_error": episode.final_error,
                "ended_by": episode.ended_by,
            },
        )
