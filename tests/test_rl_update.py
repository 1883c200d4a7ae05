"""One RL step on fixed rollouts, checked against a plain re-computation of its loss and gradients: pins what the
trainer does with sequence-level estimators (KL in the loss or in the reward, several iterations, tool tokens
masked, failed and truncated completions, rows with zero advantage skipped or not)."""

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch

from incentive.advantages import ADVANTAGES
from incentive.config import load_recipe
from incentive.data.example import Example
from incentive.engines.base import Engine, SamplingParams
from incentive.losses import build_policy_loss, kl_k3
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rewards.pipeline import RewardPipeline
from incentive.rollout.types import Completion, RolloutBatch
from incentive.run import build_template
from incentive.training.optim import build_optimizer, build_scheduler
from incentive.training.rl import RLParts, RLTrainer
from incentive.training.sampler import EpochSampler


@REWARDS.register("test-update-even-share")
class EvenShare(Reward):
    """Share of completion tokens with an even id; NaN (a failed sample) where the engine marked one to fail."""

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        scores = [sum(t % 2 == 0 for t in c.completion_ids) / max(1, c.length) for c in batch]
        return RewardResult(
            [math.nan if c.info.get("fail") else s for c, s in zip(batch, scores, strict=True)]
        )


class FixedEngine(Engine):
    """Completions drawn from a generator seeded by group id: group 0 has a completion with a masked tool span
    and a truncated one, group 1 a failed one, group 2 four equal completions (all advantages 0)."""

    def _chunk(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
    ) -> list[Completion]:
        out = []
        for example, prompt, gid in zip(examples, prompts, group_ids, strict=True):
            gen = torch.Generator().manual_seed(100 + gid)
            prompt_ids = self.encode(prompt)
            same = torch.randint(100, 5000, (5,), generator=gen).tolist()
            for k in range(params.n):
                length = int(torch.randint(3, params.max_new_tokens + 1, (1,), generator=gen))
                ids = same if gid % 3 == 2 else torch.randint(100, 5000, (length,), generator=gen).tolist()
                c = Completion(gid, example, prompt, prompt_ids, ids, self.tokenizer.decode(ids))
                if gid % 3 == 0 and k == 1:
                    c.completion_ids = ids = torch.randint(100, 5000, (7,), generator=gen).tolist()
                    c.loss_mask = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
                if gid % 3 == 0 and k == 3:
                    c.completion_ids = torch.randint(
                        100, 5000, (params.max_new_tokens,), generator=gen
                    ).tolist()
                    c.truncated = True
                if gid % 3 == 1 and k == 2:
                    c.info["fail"] = True
                out.append(c)
        return out


RECIPE = """
model: {{name: tiny-random}}
data: {{source: task:chain_sum, size: 3}}
generation: {{num_generations: 4, prompts_per_step: 3, max_new_tokens: 8, temperature: 0.8}}
rewards: [{{name: test-update-even-share}}]
optim: {{lr: 1.0e-2, max_grad_norm: null}}
advantage: {{name: {estimator}, args: {args}}}
rl: {{steps: 1, num_iterations: {iterations}, mask_truncated: {mask_truncated}, skip_zero_advantage: {skip}}}
loss: {{kl_beta: {beta}, kl_in_reward: {in_reward}, aggregation: {aggregation}}}
"""

EXAMPLES = [Example("2 + 3 =", "5", domain="a"), Example("4 + 1 =", "5", domain="b"), Example("1 + 1 =", "2")]
CASES = {
    "grpo": dict(estimator="grpo"),
    "grpo-kl-two-iterations": dict(estimator="grpo", beta=0.05, iterations=2),
    "dr_grpo-mask-truncated-all-rows": dict(estimator="dr_grpo", mask_truncated="true", skip="false"),
    "rloo-kl-in-reward-seq-mean": dict(
        estimator="rloo", beta=0.05, in_reward="true", iterations=2, aggregation="seq-mean-token-mean"
    ),
    "disco": dict(estimator="disco", args="{domain_shares: {a: 0.5, b: 0.25, None: 0.25}}"),
}
DEFAULTS = dict(
    args="{}",
    iterations=1,
    mask_truncated="false",
    skip="true",
    beta=0.0,
    in_reward="false",
    aggregation="token-mean",
)


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    yield model


def rl_step(tiny, tmp_path, case: dict) -> tuple[dict, list[tuple[dict, dict]], torch.nn.Module]:
    """The step's record, each optimizer step's (parameters, gradients) by name, and the policy as it started."""
    model, tokenizer = tiny
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(**{**DEFAULTS, **case}))
    recipe = load_recipe(path)
    policy = copy.deepcopy(model).train()
    start = copy.deepcopy(model).eval().requires_grad_(False)
    estimator = ADVANTAGES.get(recipe.advantage.name)(**recipe.advantage.args)
    estimator.fit(EXAMPLES)
    optimizer = build_optimizer(list(policy.parameters()), recipe.optim)
    parts = RLParts(
        policy=policy,
        tokenizer=tokenizer,
        template=build_template(recipe.template),
        engine=FixedEngine(policy, tokenizer),
        rewards=RewardPipeline(recipe.rewards),
        estimator=estimator,
        loss=build_policy_loss(recipe.loss, float(recipe.generation.max_new_tokens)),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, recipe.optim, 1),
        sampler=EpochSampler(EXAMPLES, 0),
        scorer=None,
        reference=(lambda: frozen(start)) if recipe.loss.kl_beta else None,
    )
    names = {id(q): n for n, q in policy.named_parameters()}
    steps: list[tuple[dict, dict]] = []

    def record(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        params = [q for g in opt.param_groups for q in g["params"] if q.grad is not None]
        steps.append(
            (
                {names[id(q)]: q.detach().clone() for q in params},
                {names[id(q)]: q.grad.clone() for q in params},
            )
        )

    optimizer.register_step_pre_hook(record)
    return RLTrainer(recipe, parts).step(1), steps, start


def plain_logprobs(
    model: torch.nn.Module, comps: Sequence[Completion], temperature: float
) -> list[torch.Tensor]:
    """Each completion's token logprobs from the model's own forward over prompt + completion."""
    out = []
    for c in comps:
        ids = torch.tensor([c.prompt_ids + c.completion_ids])
        logits = model(input_ids=ids, use_cache=False).logits[0, len(c.prompt_ids) - 1 : -1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        out.append(logp.gather(-1, torch.tensor(c.completion_ids)[:, None])[:, 0])
    return out


def expected_loss(
    model: torch.nn.Module,
    comps: list[Completion],
    adv: torch.Tensor,
    old: list[torch.Tensor] | None,
    ref: list[torch.Tensor] | None,
    case: dict,
) -> torch.Tensor:
    """The clipped surrogate (ε 0.2 / 0.28) with the case's KL and aggregation, written out for one batch."""
    beta, in_reward = case["beta"], case["in_reward"] == "true"
    logps = plain_logprobs(model, comps, 0.8)
    masks = [torch.tensor(c.trained_mask) for c in comps]
    tokens = sum(float(m.sum()) for m in masks)
    total = torch.zeros(())
    for k, (logp, mask) in enumerate(zip(logps, masks, strict=True)):
        before = old[k] if old is not None else logp.detach()
        ratio = torch.exp(logp - before)
        a = adv[k] - beta * kl_k3(before, ref[k]) if beta and in_reward else adv[k]
        loss = -torch.minimum(ratio * a, torch.clamp(ratio, 0.8, 1.28) * a)
        if beta and not in_reward:
            loss = loss + beta * kl_k3(logp, ref[k])
        if case["aggregation"] == "token-mean":
            total = total + (loss * mask).sum() / tokens
        else:
            total = total + (loss * mask).sum() / mask.sum() / len(comps)
    return total


@pytest.mark.parametrize("name", list(CASES))
def test_an_rl_step_has_the_loss_and_gradients_written_out_by_hand(tiny, tmp_path, name):
    case = {**DEFAULTS, **CASES[name]}
    record, steps, start = rl_step(tiny, tmp_path, case)
    tokenizer = tiny[1]
    engine = FixedEngine(start, tokenizer)
    template = build_template(load_recipe(tmp_path / "recipe.yaml").template)
    examples = EpochSampler(EXAMPLES, 0).take(3)  # as the trainer's sampler hands them out
    prompts = [template.render(e, tokenizer) for e in examples]
    batch = engine.generate(examples, prompts, [0, 1, 2], SamplingParams(4, 8, 0.8))
    scores = EvenShare()(batch, None).scores
    estimator = ADVANTAGES.get(case["estimator"])(**load_recipe(tmp_path / "recipe.yaml").advantage.args)
    estimator.fit(EXAMPLES)
    scores_t = torch.tensor(scores, dtype=torch.float64)
    advantages = estimator(scores_t, batch.group_ids, [c.example for c in batch])
    truncated = case["mask_truncated"] == "true"
    valid = [i for i, c in enumerate(batch) if math.isfinite(scores[i]) and not (truncated and c.truncated)]
    comps = [batch.completions[i] for i in valid]
    adv = advantages[valid]
    ref = plain_logprobs(start, comps, 0.8) if case["beta"] else None
    old = [lp.detach() for lp in plain_logprobs(start, comps, 0.8)] if case["iterations"] > 1 else None

    assert record["advantage/mean"] == pytest.approx(float(advantages.mean()), abs=1e-6)
    assert (record["advantage/min"], record["advantage/max"]) == (
        float(advantages.min()),
        float(advantages.max()),
    )
    assert record["advantage/zero_share"] == pytest.approx(float((advantages == 0).float().mean()))
    active = len(valid) if case["beta"] or case["skip"] == "false" else int((adv != 0).sum())
    assert record["train/trained_sequences"] == active
    assert record["train/masked_truncated"] == (1.0 if truncated else 0.0)
    assert len(steps) == case["iterations"]
    losses, norms = [], []
    for params, grads in steps:
        model = copy.deepcopy(start).train().requires_grad_(True)
        with torch.no_grad():
            for n, q in model.named_parameters():
                q.copy_(params[n])
        loss = expected_loss(model, comps, adv, old, ref, case)
        loss.backward()
        losses.append(float(loss.detach()))
        want = {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
        assert set(grads) <= set(want)
        scale = max(float(w.abs().max()) for w in want.values())
        assert scale > 0
        for n, g in grads.items():
            torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-5 * scale)
        norms.append(float(torch.linalg.vector_norm(torch.stack([w.norm() for w in want.values()]))))
    assert record["train/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4, abs=1e-7)
    assert record["train/grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    if case["beta"]:
        assert record["train/kl"] >= 0
