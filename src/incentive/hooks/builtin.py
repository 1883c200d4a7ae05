"""Hooks the run builds from their own config sections rather than from ``hooks:``: NOVER's proxy sync and the
held-out evals between steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from incentive.hooks.base import Hook

if TYPE_CHECKING:
    from incentive.proxy import Proxy
    from incentive.training.stage import Stage


class ProxySync(Hook):
    """Every ``every`` RL steps, moves NOVER's proxy towards the policy (``alpha``: the share of the old proxy
    kept); the proxy's weights travel in this hook's checkpoint state (``proxy`` in the recipe)."""

    def __init__(self, proxy: Proxy, every: int, alpha: float) -> None:
        self.proxy, self.every, self.alpha = proxy, every, alpha

    def after_step(self, step: int, record: dict[str, Any], trainer: Stage) -> None:
        if self.every and step % self.every == 0:
            self.proxy.sync(self.alpha)
            record["proxy/synced"] = 1

    def state_dict(self) -> dict[str, Any]:
        return self.proxy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.proxy.load_state_dict(state)


class HeldOutEval(Hook):
    """Every ``every`` steps of its stage, ``evaluate(step)``'s metrics join the step's record; ``at_last``: also
    after the last step (``last``), else never there (a stage-end eval follows)."""

    def __init__(
        self,
        stage: str,
        every: int,
        last: int,
        evaluate: Callable[[int], dict[str, Any]],
        at_last: bool = False,
    ) -> None:
        self.stages = (stage,)
        self.every, self.last, self.evaluate, self.at_last = every, last, evaluate, at_last

    def after_step(self, step: int, record: dict[str, Any], trainer: Stage) -> None:
        periodic = bool(self.every) and step % self.every == 0
        if step == self.last and self.at_last or periodic and step != self.last:
            record.update(self.evaluate(step))
