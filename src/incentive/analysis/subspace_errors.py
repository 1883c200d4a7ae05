"""The one error of the subspace analysis: bad input (not a checkpoint, mismatched models, an impossible k),
told in one line so the command line can print it as ``error: ...``."""

from __future__ import annotations


class SubspaceError(ValueError):
    """Input the subspace analysis cannot use, with what is wrong and where."""
