"""Tools for multi-turn rollouts (Pixel Reasoner-style): protocol, registry and the built-in text tools."""

from incentive.tools import grid  # noqa: F401  (registers the built-in tools)
from incentive.tools.base import TOOLS, CallProtocol, Tool, ToolCall, ToolError, observe

__all__ = ["TOOLS", "CallProtocol", "Tool", "ToolCall", "ToolError", "observe"]
