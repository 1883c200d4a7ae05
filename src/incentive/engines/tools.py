"""Multi-turn rollouts with tool calls (Pixel Reasoner's loop): the environment engine running the tool
environment (:mod:`incentive.tools.environment`), built from tools that are already constructed."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from incentive.engines.cached import CachedEngine
from incentive.engines.environment import EnvironmentEngine
from incentive.tools import CallProtocol, Tool
from incentive.tools.environment import ToolEnvironment


class ToolEngine(EnvironmentEngine):
    """Wraps a :class:`CachedEngine`: ``max_new_tokens`` bounds the tokens the policy writes per rollout; calls
    1…``max_calls`` execute and a further call ends the episode, as does a turn without a call or a context over
    ``max_context_tokens``. Completions record ``tool_calls``, ``tool_executed``, ``tool_errors``,
    ``final_tool_error`` and ``ended_by``."""

    def __init__(
        self,
        inner: CachedEngine,
        tools: Mapping[str, Tool],
        protocol: CallProtocol,
        max_calls: int = 4,
        max_observation_tokens: int = 256,
        max_context_tokens: int | None = None,
    ) -> None:
        make = partial(ToolEnvironment, tools, protocol, max_calls, max_observation_tokens)
        super().__init__(inner, make, "tools", max_context_tokens=max_context_tokens)
