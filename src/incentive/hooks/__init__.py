"""RL hooks, registered by name. Importing this package registers the built-in ones."""

from incentive.hooks import laser as _laser  # noqa: F401
from incentive.hooks.base import HOOKS, Hook

__all__ = ["HOOKS", "Hook"]
