"""Tools a policy may call mid-rollout: the call protocol (Nous-style ``<tool_call>{json}</tool_call>``), the
registry, and the error type whose message goes back to the model as an observation."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from incentive.data.example import Example
from incentive.registry import Registry


class ToolError(Exception):
    """A call the tool cannot serve; its message is returned to the model as ``Execution error: …``."""


class Tool(ABC):
    """One named operation over the example's hidden state (e.g. a full-resolution grid)."""

    @abstractmethod
    def __call__(self, arguments: dict[str, Any], example: Example) -> str:
        """The observation text for a call, or raise ToolError."""


TOOLS: Registry[type[Tool]] = Registry("tool")


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: the tool's name and its JSON arguments."""

    name: str
    arguments: dict[str, Any]


class CallProtocol:
    """Finds the last ``<tag>…</tag>`` call in a turn and formats what goes back into the context."""

    def __init__(self, tag: str = "tool_call", response_tag: str = "tool_response") -> None:
        self.tag = tag
        self.response_tag = response_tag
        self.close = f"</{tag}>"
        self._call = re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)
        self._response = re.compile(
            rf"\n?<{re.escape(response_tag)}>.*?</{re.escape(response_tag)}>\n?", re.DOTALL
        )

    def count(self, text: str) -> int:
        """How many calls a text makes."""
        return len(self._call.findall(text))

    def last_call(self, text: str) -> ToolCall:
        """The last complete call in ``text``; a malformed one raises ToolError (the model sees why)."""
        found = self._call.findall(text)
        if not found:
            raise ToolError(f"no complete <{self.tag}>…</{self.tag}> block")
        try:
            payload = json.loads(found[-1])
        except json.JSONDecodeError as err:
            raise ToolError(f"the call is not valid JSON ({err.msg} at char {err.pos})") from err
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            raise ToolError('a call must be a JSON object with a "name" string')
        arguments = payload.get("arguments", {})
        if not isinstance(arguments, dict):
            raise ToolError('"arguments" must be a JSON object')
        return ToolCall(payload["name"], arguments)

    def response(self, observation: str) -> str:
        """The observation as it is placed in the context after a call."""
        return f"\n<{self.response_tag}>\n{observation}\n</{self.response_tag}>\n"

    def split_responses(self, text: str) -> list[tuple[str, bool]]:
        """``text`` cut into (segment, is_observation) pieces, e.g. to mask tool output in an SFT target."""
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for match in self._response.finditer(text):
            if match.start() > pos:
                pieces.append((text[pos : match.start()], False))
            pieces.append((match.group(0), True))
            pos = match.end()
        if pos < len(text):
            pieces.append((text[pos:], False))
        return pieces


def observe(tools: dict[str, Tool], text: str, protocol: CallProtocol, example: Example) -> tuple[str, bool]:
    """Run the last call in ``text``: (observation for the model, whether it failed). Every failure (malformed
    call, unknown tool, bad arguments) is an ``Execution error: …`` the model can react to."""
    try:
        call = protocol.last_call(text)
        if call.name not in tools:
            raise ToolError(f"unknown tool '{call.name}'; available: {', '.join(sorted(tools))}")
        return tools[call.name](call.arguments, example), False
    except ToolError as err:
        return f"Execution error: {err}", True
