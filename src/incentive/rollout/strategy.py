"""Rollout strategies: how one example becomes its group's sampling requests (prompt variants, forced assistant
prefixes, per-variant sampling settings, labels). ``plain``, the default, is G samples of the template's prompt."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from incentive.data.example import Example
from incentive.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from incentive.templates import Template


@dataclass(frozen=True)
class Variant:
    """``n`` samples of one prompt. ``prefix`` is text forced at the start of the assistant's turn: it stays in
    the completion (ids and text) and in the loss mask, as if the policy had written it. Unset sampling settings
    are the recipe's; ``labels`` go to each completion's ``labels``; variants of one example with the same
    ``group`` key share a group id (by default all of them: the example's group)."""

    prompt: str
    n: int
    prefix: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    group: str = ""


@dataclass(frozen=True)
class RolloutContext:
    """What a strategy may use to plan an example's group: the recipe's template (and tokenizer, to render it or
    other templates) and G, the recipe's completions per prompt."""

    template: Template
    tokenizer: PreTrainedTokenizerBase
    num_generations: int

    def prompt(self, example: Example) -> str:
        """The recipe's template rendered for ``example``."""
        return self.template.render(example, self.tokenizer)


class RolloutStrategy(ABC):
    """Turns one example into the variants its group is sampled with. Subclasses take their settings as typed
    keyword arguments (the recipe's ``rollout.args``)."""

    forces_prefix: bool = False
    """Whether any variant may carry a forced prefix; a run refuses an engine that cannot force one."""

    @abstractmethod
    def variants(self, example: Example, ctx: RolloutContext) -> list[Variant]:
        """The sampling requests for ``example``'s group, in the order its completions should appear."""


ROLLOUT_STRATEGIES: Registry[type[RolloutStrategy]] = Registry("rollout strategy")


@ROLLOUT_STRATEGIES.register("plain")
class Plain(RolloutStrategy):
    """G samples of the template's prompt, nothing forced, no labels: rollouts as they were before strategies."""

    def variants(self, example: Example, ctx: RolloutContext) -> list[Variant]:
        return [Variant(ctx.prompt(example), ctx.num_generations)]
