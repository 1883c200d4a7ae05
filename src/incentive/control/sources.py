"""Every built-in hint source, registered on import: none, oracle, noisy (hints) and lm (lm_hints)."""

from incentive.control import lm_hints as _lm_hints  # noqa: F401
from incentive.control.hints import HINT_SOURCES, HintSource

__all__ = ["HINT_SOURCES", "HintSource"]
