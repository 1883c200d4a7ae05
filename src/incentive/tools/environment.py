"""Tool calls as an environment (Pixel Reasoner's loop): a turn that ends with the call's closing tag is executed
and its output comes back wrapped in the response tag; calls 1…``max_calls`` execute and a further call ends the
episode (the release's counter rule), as does a turn without a call. Tool errors come back as
``Execution error: …``; ``final_tool_error`` marks an episode whose last executed call failed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from transformers import PreTrainedTokenizerBase

from incentive.data.example import Example
from incentive.rollout.environment import ENVIRONMENTS, Environment, PolicyTurn, StepResult
from incentive.tools.base import TOOLS, CallProtocol, Tool, observe


@ENVIRONMENTS.register("tools")
class ToolEnvironment(Environment):
    """The recipe's ``tools:`` section (or ``environment: {name: tools, args: {tools: [...], ...}}``)."""

    def __init__(
        self,
        tools: Mapping[str, Tool],
        protocol: CallProtocol,
        max_calls: int = 4,
        max_observation_tokens: int = 256,
    ) -> None:
        self.tools = tools
        self.protocol = protocol
        self.max_calls = max_calls
        self.max_observation_tokens = max_observation_tokens
        self.stop_text = protocol.close

    @classmethod
    def factory(
        cls,
        tools: list[dict[str, Any]],
        max_calls: int = 4,
        max_observation_tokens: int = 256,
        call_tag: str = "tool_call",
        response_tag: str = "tool_response",
    ) -> Callable[[], Environment]:
        """The tools are built once, from ``[{name, args}, ...]``, and shared by every episode."""
        built: dict[str, Tool] = {}
        for entry in tools:
            name, args = entry["name"], entry.get("args", {})
            try:
                built[name] = TOOLS.get(name)(**args)
            except (KeyError, TypeError, ValueError) as err:
                raise type(err)(f"tool '{name}': {err}") from err
        return partial(cls, built, CallProtocol(call_tag, response_tag), max_calls, max_observation_tokens)

    def reset(self, example: Example, tokenizer: PreTrainedTokenizerBase) -> None:
        self.example = example
        self.tokenizer = tokenizer
        self.calls = 0
        self.executed = 0
        self.errors: list[str] = []
        self.final_error = False

    def step(self, turn: PolicyTurn) -> StepResult:
        """A turn that ends with a call runs the last call in the transcript; any other ends the episode."""
        if turn.ended_by != "stop":
            return StepResult(done=True, info=self._info())
        self.calls += 1
        if self.executed >= self.max_calls:
            return StepResult(done=True, reason="max_calls", info=self._info())
        observation = self._execute(turn.transcript)
        return StepResult(observation=self.protocol.response(observation), info=self._info())

    def split_responses(self, text: str) -> list[tuple[str, bool]]:
        return self.protocol.split_responses(text)

    def _execute(self, transcript: str) -> str:
        self.executed += 1
        observation, failed = observe(self.tools, transcript, self.protocol, self.example)
        self.final_error = failed
        if failed:
            self.errors.append(observation)
        ids = self.tokenizer(observation, add_special_tokens=False).input_ids
        if len(ids) > self.max_observation_tokens:
            observation = self.tokenizer.decode(ids[: self.max_observation_tokens]) + " …(cut)"
        return observation

    def _info(self) -> dict[str, Any]:
        return {
            "tool_calls": self.calls,
            "tool_executed": self.executed,
            "tool_errors": list(self.errors),
            "final_tool_error": self.final_error,
        }
