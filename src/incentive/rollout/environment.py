"""The environment protocol for multi-turn rollouts: an episode starts from an example, the environment sees
each finished policy turn and answers with an observation (joins the context, never trained on), optional step
rewards on tokens of that turn, and whether the episode is over."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from transformers import PreTrainedTokenizerBase

from incentive.data.example import Example
from incentive.registry import Registry


@dataclass(frozen=True)
class PolicyTurn:
    """A finished turn of the policy: its tokens and text, everything after the prompt so far (``transcript``:
    earlier turns and observations, then this turn, decoded together), its number (from 0) and why it ended:
    ``eos``, ``stop`` (the environment's ``stop_text``), ``turn_limit`` (the recipe's ``max_turn_tokens``) or
    ``length`` (the episode's token budget, ``generation.max_new_tokens``, is spent: the episode ends)."""

    index: int
    token_ids: list[int]
    text: str
    transcript: str
    ended_by: str


@dataclass
class StepResult:
    """The environment's answer to a turn. ``observation`` joins the context (loss mask 0) unless the episode
    ends; ``rewards`` are step rewards keyed by token index within the turn (negative counts from its end:
    -1 is the turn's last token); ``done`` ends the episode, ``truncated`` too and marks the completion
    truncated; ``reason`` is recorded as ``ended_by``; ``info`` is merged into the completion's ``info``."""

    observation: str = ""
    rewards: dict[int, float] = field(default_factory=dict)
    done: bool = False
    truncated: bool = False
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)


class Environment(ABC):
    """One episode's environment: the engine builds one per episode (``factory``), calls ``reset`` with its
    example, then ``step`` after every turn of the policy. An exception from either fails only that episode,
    with the reason. All episodes of a batch decode together, turn by turn."""

    stop_text: str | None = None
    """A turn also ends once the policy writes this text (e.g. ``</tool_call>``), which is kept; the same for
    every episode of an environment. None: turns end at an end token or a token limit."""

    @classmethod
    def factory(cls, **args: Any) -> Callable[[], Environment]:
        """Builds an episode's environment from the recipe's ``environment.args``. Override to build shared,
        costly parts once (a corpus, tools) and hand them to each episode's environment."""
        return partial(cls, **args)

    @abstractmethod
    def reset(self, example: Example, tokenizer: PreTrainedTokenizerBase) -> None:
        """Start an episode on ``example`` (the tokenizer is there to count or cut observation tokens)."""

    @abstractmethod
    def step(self, turn: PolicyTurn) -> StepResult:
        """React to a finished policy turn."""

    def split_responses(self, text: str) -> list[tuple[str, bool]]:
        """``text`` (an SFT target trace) cut into (piece, is_observation) pieces, so SFT leaves the pieces the
        environment would have written out of the loss; by default nothing is an observation."""
        return [(text, False)] if text else []


ENVIRONMENTS: Registry[type[Environment]] = Registry("environment")
