"""Prior prompt engineering's rewards (spec: methods/prior-prompt-engineering.md §3): a tag-counting format
reward and an accuracy reward that reads only the answer block. Both follow the template's tags, so one pair of
parts serves all five prior prompts (think, plan, code, knowledge, examples). The recipe weighs them 0.5 / 0.5;
accuracy does not depend on the format (a correct answer without the intermediate block still earns 0.5)."""

from __future__ import annotations

from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.verifier import RuleVerifier, Verdict, extract_answer, last_boxed
from incentive.rollout.types import RolloutBatch


@REWARDS.register("tag_format")
class TagFormatReward(Reward):
    """1 iff the completion is exactly one ``<x>…</x>`` block then exactly one answer block, nothing around
    them; tags are counted, so a repeated or nested block fails (the plain ``format`` reward does not count)."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        t, a = ctx.tags.think, ctx.tags.answer
        tags = (f"<{t}>", f"</{t}>", f"<{a}>", f"</{a}>")
        return RewardResult(
            [
                float(parsed.strict and all(c.text.count(tag) == 1 for tag in tags))
                for c, parsed in zip(batch, ctx.parsed(batch), strict=True)
            ]
        )


@REWARDS.register("answer_verifier")
class AnswerBlockVerifier(RuleVerifier):
    """The rule verifier on the answer block only: a ``\\boxed{}`` outside it does not count, and with
    ``require_box`` (default, as in the paper) the block must hold one."""

    def __init__(self, require_box: bool = True, timeout_s: float = 5.0, rel_tol: float = 1e-6) -> None:
        super().__init__(timeout_s, rel_tol)
        self.require_box = require_box

    def verdicts(self, batch: RolloutBatch, ctx: RewardContext) -> list[Verdict]:
        out = []
        for c, parsed in zip(batch, ctx.parsed(batch), strict=True):
            block = parsed.answer
            if block is None:
                out.append(Verdict(0.0, None, "no answer block"))
            elif self.require_box and last_boxed(block) is None:
                out.append(Verdict(0.0, block, "no \\boxed{} in the answer block"))
            else:
                out.append(self.verify(c.example, extract_answer(block, block)))
        return out
