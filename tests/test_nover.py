"""NOVER: format, reasoning perplexity, rank and efficiency rewards (spec §12), and the proxy with its sync."""

from __future__ import annotations

import copy
import math
import random
import re
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from incentive.config import TemplateConfig
from incentive.data.example import Example
from incentive.logprobs import target_logprobs
from incentive.models.loading import load_model, load_tokenizer
from incentive.proxy import CopyProxy, LoraProxy, compress, make_proxy
from incentive.rewards import REWARDS, RewardContext
from incentive.rewards.format import FormatReward
from incentive.rewards.nover import (
    NoverEfficiency,
    NoverReasoning,
    efficiency_rewards,
    group_ranks,
    normaliser,
    rank_rewards,
    reasoning_perplexity,
)
from incentive.rollout.types import Completion, RolloutBatch
from incentive.run import build_template
from incentive.scorer import ModelScorer
from incentive.templates import TagFormat

# ---------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


@pytest.fixture(scope="module")
def base_model():
    return load_model("tiny-random")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def tagged(reasoning: str, answer: str = "x") -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"


def completion(
    tok, group: int, text: str, reference: str = "42", prompt: str = "What is 6*7?\n"
) -> Completion:
    return Completion(group, Example(prompt, reference), prompt, ids(tok, prompt), [], text)


class MockScorer:
    """Logprobs from a function of (context ids, target ids); records every call."""

    def __init__(self, fn: Callable[[list[int], list[int]], list[float]] | None = None) -> None:
        self.fn = fn or (lambda context, target: [-2.0] * len(target))
        self.calls: list[tuple[list[list[int]], list[list[int]], str]] = []

    def logprobs(
        self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], model: str = "proxy"
    ) -> list[torch.Tensor]:
        self.calls.append(([list(c) for c in contexts], [list(t) for t in targets], model))
        return [
            torch.tensor(self.fn(list(c), list(t)), dtype=torch.float32)
            for c, t in zip(contexts, targets, strict=True)
        ]


def context(tok, scorer, tags: TagFormat | None = None) -> RewardContext:
    return RewardContext(tokenizer=tok, tags=tags or TagFormat(), scorer=scorer)


def hashed(context: list[int], target: list[int]) -> list[float]:
    """A deterministic 'model': the same input always gets the same logprobs."""
    rng = random.Random(hash((tuple(context), tuple(target))))
    return [-0.5 * rng.randint(1, 6) for _ in target]


# ---------------------------------------------------------------------------------------------------------------
# format


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("\n <think>\n a \n</think>\n\n  <answer> b\n</answer>\n ", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("Sure. <think>a</think><answer>b</answer>", 0.0),
        ("<think>a</think><answer>b</answer> Done.", 0.0),
        ("<think>a</think><think>c</think><answer>b</answer>", 0.0),
        ("<think>a</think><answer>b", 0.0),
        ("<think>a</think> so <answer>b</answer>", 0.0),
    ],
)
def test_format_reward(tok, text: str, expected: float) -> None:
    batch = RolloutBatch([completion(tok, 0, text)])
    assert FormatReward()(batch, context(tok, None)).scores == [expected]


def test_format_custom_tags(tok) -> None:
    tags = TagFormat("reasoning", "story")
    texts = ["<reasoning>a</reasoning>\n<story>b</story>", "<think>a</think><answer>b</answer>"]
    batch = RolloutBatch([completion(tok, 0, t) for t in texts])
    assert FormatReward()(batch, context(tok, None, tags)).scores == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# reasoning perplexity


@pytest.mark.parametrize(("length", "expected"), [(1, 7.389), (10, 2.718), (100, 1.948), (1000, 1.649)])
def test_normalised_perplexity(tok, length: int, expected: float) -> None:
    reasoning = " ".join(["a"] * length)
    assert len(ids(tok, reasoning)) == length
    batch = RolloutBatch([completion(tok, 0, tagged(reasoning))])
    result = NoverReasoning()(batch, context(tok, MockScorer()))
    assert result.extras["ppl"][0] == pytest.approx(expected, abs=1e-3)
    assert result.extras["ppl_raw"][0] == pytest.approx(math.exp(2.0))


def test_natural_log_normaliser(tok) -> None:
    assert normaliser(100, math.e) == pytest.approx(5.605, abs=1e-3)
    assert normaliser(1000) == 4.0 and normaliser(1) == 1.0 and normaliser(0) == 1.0
    batch = RolloutBatch([completion(tok, 0, tagged(" ".join(["a"] * 100)))])
    result = NoverReasoning(log_base=math.e)(batch, context(tok, MockScorer()))
    assert result.extras["ppl"][0] == pytest.approx(math.exp(2.0 / (1 + math.log(100))))


@pytest.mark.parametrize(
    "target_block",
    [
        "<{answer}>\n{reference}\n</{answer}>",  # scored from <answer>
        "\n<{answer}>\n{reference}\n</{answer}>",  # the released code's layout (the default)
        "\n\n<{answer}>\n{reference}\n</{answer}>",  # joint tokenization would merge "\n" + "\n" across the boundary
    ],
)
def test_scored_tokens_are_exactly_the_target(tok, target_block: str) -> None:
    reasoning, reference = "six times seven is forty two", "42"
    c = completion(tok, 0, tagged(reasoning), reference)
    scorer = MockScorer()
    reasoning_perplexity(
        RolloutBatch([c]), context(tok, scorer), NoverReasoning(target_block=target_block).settings
    )
    ((contexts, targets, model),) = scorer.calls
    block = f"<think>\n{reasoning}\n</think>\n"
    target = target_block.format(answer="answer", reference=reference)
    assert model == "proxy"
    # the prompt exactly as the policy saw it (no "Question: Question:"), then the reasoning block
    assert contexts == [c.prompt_ids + ids(tok, block)]
    assert targets == [ids(tok, target)]
    assert not set(ids(tok, reasoning)) & set(targets[0])  # reasoning tokens are never scored
    joint = ids(tok, c.prompt_text + block + target)
    if target_block.startswith("\n\n"):
        assert (
            joint != contexts[0] + targets[0]
        )  # the case that tokenizing jointly would get wrong (pitfall 3)


def test_default_layout_scores_exactly_the_released_target_ids(tok) -> None:
    c = completion(tok, 0, tagged("six times seven is forty two"), "42")
    scorer = MockScorer()
    NoverReasoning()(RolloutBatch([c]), context(tok, scorer))
    ((contexts, targets, _),) = scorer.calls
    # "\n" "<" "answer" ">" "\n" "4" "2" "\n" "</" "answer" ">": the leading newline and the tags are scored
    assert targets == [[198, 44, 11247, 46, 198, 36, 34, 198, 9617, 11247, 46]]
    assert contexts[0][-4:] == [9617, 17400, 46, 198]  # the context ends "</" "think" ">" "\n"
    assert tok.decode(contexts[0] + targets[0]).endswith("</think>\n\n<answer>\n42\n</answer>")
    # this tokenizer splits "\n\n<" as "\n" "\n" "<", so the released code's joint tokenization is the same
    released = c.prompt_text + "<think>\nsix times seven is forty two\n</think>\n\n<answer>\n42\n</answer>"
    assert ids(tok, released) == contexts[0] + targets[0]


def test_nover_template_renders_the_released_layout(tok) -> None:
    tags = build_template(TemplateConfig(name="nover")).tags
    text = tags.render("6 * 7 = 42", "42")
    assert text == "<think>\n6 * 7 = 42\n</think>\n\n<answer>\n42\n</answer>"
    assert tags.parse(text).strict


def test_one_scorer_call_shared_by_both_parts(tok) -> None:
    texts = [tagged("a b"), "oops", tagged("a b c d"), tagged("a")]
    batch = RolloutBatch([completion(tok, g, t) for g in (0, 1) for t in texts])
    scorer = MockScorer(hashed)
    ctx = context(tok, scorer)
    NoverReasoning()(batch, ctx)
    NoverEfficiency()(batch, ctx)
    assert len(scorer.calls) == 1 and len(scorer.calls[0][0]) == 6
    empty = MockScorer()
    NoverReasoning()(RolloutBatch([completion(tok, 0, "oops")]), context(tok, empty))
    assert empty.calls == []


def test_scorer_model_name(tok) -> None:
    scorer = MockScorer()
    NoverReasoning(model="policy")(RolloutBatch([completion(tok, 0, tagged("a"))]), context(tok, scorer))
    assert scorer.calls[0][2] == "policy"


def test_empty_reference_invalidates_its_group_only(tok) -> None:
    batch = RolloutBatch(
        [completion(tok, 0, tagged("a"), reference=" "), completion(tok, 1, tagged("a"), reference="7")]
        + [completion(tok, 0, tagged("a b"), reference=" ")]
    )
    ctx = context(tok, MockScorer())
    reasoning, efficiency = NoverReasoning()(batch, ctx), NoverEfficiency()(batch, ctx)
    assert reasoning.scores == [0.0, 1.0, 0.0] and efficiency.scores == [0.0, 0.0, 0.0]
    assert reasoning.reasons == ["empty reference", None, "empty reference"]
    assert FormatReward()(batch, ctx).scores == [1.0, 1.0, 1.0]


def test_empty_reasoning_policy(tok) -> None:
    batch = RolloutBatch(
        [completion(tok, 0, "<think></think><answer>42</answer>"), completion(tok, 0, tagged("a"))]
    )
    invalid = NoverReasoning()(batch, context(tok, MockScorer()))
    assert invalid.scores == [0.0, 1.0] and invalid.reasons[0] == "empty reasoning"
    assert math.isnan(invalid.extras["ppl"][0])
    scored = NoverReasoning(empty_reasoning="score")(batch, context(tok, MockScorer()))
    assert scored.extras["ppl"] == pytest.approx([math.exp(2.0), math.exp(2.0)])  # N(0) = N(1) = 1
    assert scored.scores == [1.0, 0.5]
    with pytest.raises(ValueError):
        NoverReasoning(empty_reasoning="skip")  # type: ignore[arg-type]


def test_registered(tok) -> None:
    assert REWARDS.get("nover_reasoning") is NoverReasoning
    assert REWARDS.get("nover_efficiency") is NoverEfficiency
    with pytest.raises(ValueError, match="scorer"):
        NoverReasoning()(RolloutBatch([completion(tok, 0, tagged("a"))]), context(tok, None))


# ---------------------------------------------------------------------------------------------------------------
# rank and efficiency


def test_rank_rewards() -> None:
    ppl = [3.0, math.inf, 1.5, 2.0, math.inf]
    assert rank_rewards(ppl, [math.isfinite(p) for p in ppl]) == pytest.approx([1 / 3, 0, 1, 2 / 3, 0])
    assert rank_rewards([1.0, 2.0], [False, False]) == [0.0, 0.0]
    assert rank_rewards([5.0, 1.0], [True, False]) == [1.0, 0.0]
    assert rank_rewards([2.0, 1.0, 2.0], [True, True, True]) == pytest.approx(
        [2 / 3, 1.0, 1 / 3]
    )  # ties: earlier wins


def test_group_ranks_logged_per_sample() -> None:
    ranks = group_ranks([3.0, math.inf, 1.5, 2.0], [True, False, True, True])
    assert ranks[0] == 3 and math.isnan(ranks[1]) and ranks[2:] == [1, 2]
    assert group_ranks([2.0, 2.0], [True, True]) == [1, 2]


def test_efficiency_rewards() -> None:
    assert efficiency_rewards([100, 50, 200], [2.0, 1.5, 3.0], [True] * 3) == pytest.approx([0.5, 1.0, 0.0])
    assert efficiency_rewards([100, 50], [2.0, 1.5], [True, False]) == [0.0, 0.0]
    assert efficiency_rewards([50, 50, 50], [1.0, 2.0, 3.0], [True] * 3) == [0.0, 0.0, 0.0]
    assert efficiency_rewards([10, 20, 30], [1.0, 1.0, 1.0], [True] * 3) == [0.0, 0.0, 0.0]
    assert efficiency_rewards([10, 20, 30], [1.0, 2.0, 3.0], [True, False, True]) == [1.0, 0.0, 0.0]


def test_groups_interleaved_match_groups_alone(tok) -> None:
    rng = random.Random(0)
    groups = {
        gid: [
            completion(tok, gid, tagged(" ".join(["w"] * rng.randint(1, 30))), reference=f"r{gid}")
            for _ in range(6)
        ]
        for gid in (7, 3)
    }
    groups[7][2] = completion(tok, 7, "broken", reference="r7")
    alone: dict[int, tuple[list[float], list[float]]] = {}
    for gid, members in groups.items():
        batch, ctx = RolloutBatch(members), context(tok, MockScorer(hashed))
        alone[gid] = (NoverReasoning()(batch, ctx).scores, NoverEfficiency()(batch, ctx).scores)
    mixed = [(gid, k, c) for gid, members in groups.items() for k, c in enumerate(members)]
    rng.shuffle(mixed)
    batch, ctx = RolloutBatch([c for _, _, c in mixed]), context(tok, MockScorer(hashed))
    reasoning, efficiency = NoverReasoning()(batch, ctx).scores, NoverEfficiency()(batch, ctx).scores
    for pos, (gid, k, _) in enumerate(mixed):
        assert reasoning[pos] == alone[gid][0][k] and efficiency[pos] == alone[gid][1][k]
    assert sorted(reasoning) == sorted(alone[7][0] + alone[3][0])


# ---------------------------------------------------------------------------------------------------------------
# an independent, deliberately plain reimplementation of spec §4, compared on random batches

BROKEN = [
    "Sure. <think>{r}</think><answer>{a}</answer>",
    "<think>{r}</think><answer>{a}</answer> trailing",
    "<think>{r}</think><think>{r}</think><answer>{a}</answer>",
    "<think>{r}</think><answer>{a}",
    "<think>{r}<answer>{a}</answer>",
]
WORDS = ["alpha", "beta", "x", "7", "plus", "equals", "so"]


def table_logprobs(reasoning: str, reference: str, n: int) -> list[float]:
    """The mock model's logprobs: fixed by (reasoning, reference), multiples of 0.5 so sums are exact."""
    rng = random.Random(f"{reasoning}|{reference}")
    if rng.random() < 0.3:
        return [-1.0] * n
    return [-0.5 * rng.randint(1, 6) for _ in range(n)]


class TableScorer(MockScorer):
    """Finds the reasoning and the reference by decoding, and answers from ``table_logprobs``."""

    def __init__(self, tok) -> None:
        def fn(context: list[int], target: list[int]) -> list[float]:
            reasoning = re.findall(r"<think>\n(.*?)\n</think>\n", tok.decode(context), re.S)[-1]
            reference = re.fullmatch(r"\n<answer>\n(.*)\n</answer>", tok.decode(target), re.S)
            assert reference is not None
            return table_logprobs(reasoning, reference.group(1), len(target))

        super().__init__(fn)


def random_batch(tok, rng: random.Random) -> tuple[RolloutBatch, list[bool]]:
    """Random groups (ids, sizes, order), validity, duplicated reasonings (exact ties) and empty references."""
    items: list[tuple[Completion, bool]] = []
    for gid in rng.sample(range(100), rng.randint(1, 4)):
        reference = "" if rng.random() < 0.1 else " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))
        pool = [" ".join(rng.choices(WORDS, k=rng.randint(1, 8))) for _ in range(3)]
        for _ in range(rng.randint(1, 6)):
            reasoning = (
                rng.choice(pool) if rng.random() < 0.5 else " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
            )
            kind = rng.random()
            if kind < 0.65:
                text, strict = tagged(reasoning, "ans"), True
            elif kind < 0.75:
                text, strict = "<think> </think><answer>ans</answer>", True
            else:
                text, strict = rng.choice(BROKEN).format(r=reasoning, a="ans"), False
            items.append((completion(tok, gid, text, reference, prompt=f"Q{gid}?\n"), strict))
    rng.shuffle(items)
    return RolloutBatch([c for c, _ in items]), [s for _, s in items]


def plain_nover(
    tok, batch: RolloutBatch, strict: list[bool], w: tuple[float, float, float]
) -> dict[str, list]:
    """Spec §4 written out: P_r, ranks, efficiency and the conditional weighted sum, with loops and numpy."""
    n = len(batch)
    r_f = [1.0 if s else 0.0 for s in strict]
    ppl, lengths = [math.inf] * n, [0] * n
    for i, c in enumerate(batch):
        reasoning = re.search(r"<think>(.*?)</think>", c.text, re.S)
        reference = c.example.reference.strip()
        if not strict[i] or reasoning is None or not reference:
            continue
        lengths[i] = len(tok(reasoning.group(1).strip(), add_special_tokens=False)["input_ids"])
        if lengths[i] == 0:
            continue
        target_len = len(tok(f"\n<answer>\n{reference}\n</answer>", add_special_tokens=False)["input_ids"])
        lp = table_logprobs(reasoning.group(1).strip(), reference, target_len)
        nll = -sum(lp) / len(lp)
        ppl[i] = math.exp(nll / max(1.0, 1.0 + float(np.log10(lengths[i]))))
    r_r, r_e = [0.0] * n, [0.0] * n
    for gid in set(batch.group_ids):
        members = [i for i in range(n) if batch.completions[i].group_id == gid and math.isfinite(ppl[i])]
        order = np.argsort(np.array([ppl[i] for i in members]), kind="stable")
        for k, pos in enumerate(order):
            r_r[members[pos]] = (len(members) - k) / len(members)
        if len(members) >= 2:
            for i in members:
                wins = sum(1 for j in members if j != i and lengths[i] < lengths[j] and ppl[i] < ppl[j])
                r_e[i] = wins / (len(members) - 1)
    total = [w[0] * r_f[i] + (w[1] * r_r[i] + w[2] * r_e[i] if r_f[i] == 1 else 0.0) for i in range(n)]
    return {"format": r_f, "reasoning": r_r, "efficiency": r_e, "total": total, "ppl": ppl}


def test_matches_plain_reimplementation_on_random_batches(tok) -> None:
    rng = random.Random(1234)
    weights = (1.0, 1.0, 0.1)
    ties = 0
    for _ in range(200):
        batch, strict = random_batch(tok, rng)
        scorer = TableScorer(tok)
        ctx = context(tok, scorer)
        fmt = FormatReward()(batch, ctx).scores
        reasoning = NoverReasoning()(batch, ctx)
        efficiency = NoverEfficiency()(batch, ctx).scores
        total = [
            weights[0] * f + weights[1] * r + weights[2] * e
            for f, r, e in zip(fmt, reasoning.scores, efficiency, strict=True)
        ]
        want = plain_nover(tok, batch, strict, weights)
        assert fmt == want["format"]
        assert reasoning.scores == pytest.approx(want["reasoning"], abs=1e-12)
        assert efficiency == pytest.approx(want["efficiency"], abs=1e-12)
        assert total == pytest.approx(want["total"], abs=1e-12)
        got_ppl = [p if math.isfinite(p) else math.inf for p in reasoning.extras["ppl"]]
        assert got_ppl == pytest.approx(want["ppl"], rel=1e-12)
        assert len(scorer.calls) <= 1
        finite = [p for p in want["ppl"] if math.isfinite(p)]
        ties += len(finite) - len(set(finite))
    assert ties > 20  # the random batches do exercise tie-breaking


# ---------------------------------------------------------------------------------------------------------------
# proxy


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Move every trainable tensor, as a training step would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


INPUT = torch.tensor([[1, 5, 9, 200, 31, 7, 8], [3, 4, 400, 21, 11, 12, 13]])


def lora_policy(base_model, **extra) -> PeftModel:
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], **extra
    )
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # tied lm_head without ensure_weight_tying: peft warns, copies lm_head
        policy = get_peft_model(copy.deepcopy(base_model), config)
    perturb(policy, seed=1)  # B ≠ 0, so the adapter matters from the start
    return policy


def delta_w(proxy: LoraProxy, name: str) -> torch.Tensor:
    return proxy.layers[name].scaling[proxy.adapter] * proxy.B[name].double() @ proxy.A[name].double()


def policy_delta_w(proxy: LoraProxy, name: str) -> torch.Tensor:
    layer = proxy.layers[name]
    b, a = layer.lora_B[proxy.adapter].weight, layer.lora_A[proxy.adapter].weight
    return layer.scaling[proxy.adapter] * b.detach().double() @ a.detach().double()


def test_full_copy_proxy_ema(base_model) -> None:
    policy = copy.deepcopy(base_model)
    proxy = make_proxy(policy, "ema")
    assert isinstance(proxy, CopyProxy)
    with proxy.view() as net:
        assert torch.equal(logits(net, INPUT), logits(policy, INPUT))
    old = {k: v.clone() for k, v in proxy.state_dict().items()}
    perturb(policy)
    proxy.sync(0.7)
    policy_state = policy.state_dict()
    for key, value in proxy.state_dict().items():
        torch.testing.assert_close(value, 0.7 * old[key] + 0.3 * policy_state[key], rtol=0, atol=1e-6)
    assert proxy.model.lm_head.weight is proxy.model.model.embed_tokens.weight  # still tied, mixed once
    assert not any(p.requires_grad for p in proxy.model.parameters())


def test_frozen_proxies_never_move(base_model) -> None:
    policy = copy.deepcopy(base_model)
    proxy = make_proxy(policy, "frozen")
    before = logits(policy, INPUT)
    perturb(policy)
    proxy.sync(0.5)
    with proxy.view() as net:
        assert torch.equal(logits(net, INPUT), before)
    lora = lora_policy(base_model)
    lora_proxy = make_proxy(lora, "frozen")
    before = logits(lora, INPUT)
    perturb(lora, seed=2)  # the live policy moves; a frozen proxy is a snapshot, not the live adapter
    lora_proxy.sync(0.5)
    with lora_proxy.view() as net:
        assert torch.allclose(logits(net, INPUT), before, atol=1e-5)
    assert not torch.allclose(logits(lora, INPUT), before, atol=1e-3)


@pytest.mark.parametrize("extra", [{}, {"ensure_weight_tying": True}])
def test_lora_proxy_view_equals_policy_at_init(base_model, extra) -> None:
    policy = lora_policy(base_model, **extra)
    proxy = make_proxy(policy, "ema", "exact")
    want = logits(policy, INPUT)  # outside the view: inside it, the shared model *is* the proxy
    base = logits(base_model, INPUT)
    with proxy.view() as net:
        torch.testing.assert_close(logits(net, INPUT), want, rtol=0, atol=1e-5)
        assert not torch.allclose(logits(net, INPUT), base, atol=1e-3)  # the proxy's delta is applied
    perturb(policy, seed=3)
    assert not torch.allclose(logits(policy, INPUT), want, atol=1e-3)
    with torch.no_grad(), proxy.view() as net:  # the proxy does not follow the live policy
        torch.testing.assert_close(net(input_ids=INPUT).logits, want, rtol=0, atol=1e-5)


def test_lora_factors_sync_is_ema_of_each_factor(base_model) -> None:
    policy = lora_policy(base_model)
    proxy = make_proxy(policy, "ema", "factors")
    old = {k: v.clone() for k, v in proxy.state_dict().items()}
    perturb(policy, seed=4)
    proxy.sync(0.9)
    adapter = dict(policy.named_parameters())
    for key, value in proxy.state_dict().items():
        kind, name = key.split(".", 1)
        if kind == "saved":
            module, param = name.rsplit(".", 1)
            theirs = adapter[f"{module}.modules_to_save.default.{param}"]
        else:
            theirs = adapter[f"{name}.{kind}.default.weight"]
        torch.testing.assert_close(value, 0.9 * old[key] + 0.1 * theirs.detach(), rtol=0, atol=1e-6)
    proxy.sync(0.0)  # a full sync makes the proxy the policy again
    want = logits(policy, INPUT)
    with proxy.view() as net:
        torch.testing.assert_close(logits(net, INPUT), want, rtol=0, atol=1e-5)


def test_lora_exact_sync_mixes_delta_w(base_model) -> None:
    policy = lora_policy(base_model)
    proxy = make_proxy(policy, "ema", "exact")
    assert isinstance(proxy, LoraProxy)
    alpha = 0.6
    for step in range(4):
        previous = {name: delta_w(proxy, name) for name in proxy.layers}
        perturb(policy, scale=0.2, seed=10 + step)
        proxy.sync(alpha)
        for name in proxy.layers:
            want = alpha * previous[name] + (1 - alpha) * policy_delta_w(proxy, name)
            torch.testing.assert_close(delta_w(proxy, name), want, rtol=0, atol=1e-5)
            rank, (out_features, in_features) = (
                proxy.A[name].shape[0],
                proxy.layers[name].base_layer.weight.shape,
            )
            assert rank <= min(4 * (step + 2), in_features, out_features)
    assert max(a.shape[0] for a in proxy.A.values()) > 4  # exact mixing does raise the rank
    # the proxy view runs exactly that ΔW on the shared base weights
    merged = copy.deepcopy(base_model)
    with torch.no_grad():
        for name in proxy.layers:
            target = merged.get_submodule(name.removeprefix("base_model.model."))
            target.weight += delta_w(proxy, name).float()
        merged.lm_head = copy.deepcopy(proxy.saved["base_model.model.lm_head"])
    with proxy.view() as net:
        torch.testing.assert_close(logits(net, INPUT), logits(merged, INPUT), rtol=0, atol=1e-4)


def test_lora_proxy_keeps_one_copy_of_base_weights(base_model) -> None:
    policy = lora_policy(base_model)
    proxy = make_proxy(policy, "ema", "exact")
    perturb(policy, seed=5)
    proxy.sync(0.5)
    base_ptrs = {
        p.data_ptr() for n, p in policy.named_parameters() if "lora_" not in n and "modules_to_save" not in n
    }
    state = proxy.state_dict()
    assert not {t.data_ptr() for t in state.values()} & base_ptrs
    for name, layer in proxy.layers.items():
        assert layer.base_layer.weight.shape not in {proxy.A[name].shape, proxy.B[name].shape}
    lora_numel = sum(t.numel() for k, t in state.items() if not k.startswith("saved."))
    assert lora_numel < sum(layer.base_layer.weight.numel() for layer in proxy.layers.values())


def test_lora_view_cleans_up_even_on_error(base_model) -> None:
    policy = lora_policy(base_model)
    proxy = make_proxy(policy, "ema", "exact")
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    lm_head = policy.get_base_model().lm_head.original_module
    before = logits(policy, INPUT)
    policy.train()
    with pytest.raises(KeyError), proxy.view() as net:
        assert not net.training
        raise KeyError("boom")
    assert policy.training
    assert all(not layer._forward_hooks for layer in proxy.layers.values())
    assert policy.get_base_model().lm_head.original_module is lm_head
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    assert torch.equal(logits(policy, INPUT), before)
    with proxy.view(), pytest.raises(RuntimeError, match="already open"), proxy.view():
        pass


def test_lora_state_dict_round_trip(base_model) -> None:
    policy = lora_policy(base_model)
    proxy = make_proxy(policy, "ema", "exact")
    for seed in (6, 7):
        perturb(policy, seed=seed)
        proxy.sync(0.5)
    restored = make_proxy(policy, "ema", "exact")
    restored.load_state_dict(proxy.state_dict())
    with proxy.view() as net:
        want = logits(net, INPUT)
    with restored.view() as net:
        assert torch.equal(logits(net, INPUT), want)
    with pytest.raises(KeyError):
        restored.load_state_dict({})


def test_compress_keeps_product_and_drops_rank() -> None:
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    b_cat, a_cat = torch.cat([b, 2 * b], dim=1), torch.cat([a, a], dim=0)  # rank 3 written with 6 factors
    b_new, a_new = compress(b_cat, a_cat)
    assert b_new.shape == (12, 3) and a_new.shape == (3, 9)
    torch.testing.assert_close(b_new @ a_new, b_cat @ a_cat)
    b_zero, a_zero = compress(torch.zeros(12, 4, dtype=torch.float64), a_cat[:4])
    assert b_zero.shape == (12, 0) and a_zero.shape == (0, 9)
    b_cap, a_cap = compress(b_cat, a_cat, max_rank=1)
    assert b_cap.shape == (12, 1)


def test_lora_proxy_with_zero_rank_runs(base_model) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=4, target_modules=["q_proj"]))
    proxy = make_proxy(policy, "ema", "exact")
    proxy.sync(0.5)  # B = 0 on both sides: ΔW = 0, rank 0
    assert all(a.shape[0] == 0 for a in proxy.A.values())
    with proxy.view() as net:
        assert torch.equal(logits(net, INPUT), logits(base_model, INPUT))


# ---------------------------------------------------------------------------------------------------------------
# end to end: real tiny model, LoRA proxy view, ModelScorer


def test_rewards_with_real_scorer_and_lora_proxy(tok, base_model) -> None:
    policy = lora_policy(base_model)
    proxy = make_proxy(policy, "ema", "exact")
    scorer = ModelScorer({"proxy": proxy.view})
    texts = [tagged("6 times 7 is 42"), tagged("no idea at all really"), "bad", tagged("42")]
    batch = RolloutBatch([completion(tok, g, t) for g in (0, 1) for t in texts])
    ctx = context(tok, scorer)
    reasoning = NoverReasoning()(batch, ctx)
    assert sorted(reasoning.scores[:4]) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert reasoning.scores[:4] == reasoning.scores[4:]
    # the scored logprobs are those of the target after prompt + reasoning, computed by hand with the policy
    # (equal to the proxy at init)
    c = batch.completions[0]
    ctx_ids = c.prompt_ids + ids(tok, "<think>\n6 times 7 is 42\n</think>\n")
    lp = target_logprobs(policy, [ctx_ids], [ids(tok, "\n<answer>\n42\n</answer>")])[0]
    nll = -lp.double().mean().item()
    assert reasoning.extras["ppl_raw"][0] == pytest.approx(math.exp(nll), rel=1e-4)
    assert reasoning.extras["ppl"][0] == pytest.approx(
        math.exp(nll / normaliser(len(ids(tok, "6 times 7 is 42")))), rel=1e-4
    )


def test_logged_sample_carries_reasoning_and_nover_details() -> None:
    from incentive.rewards.pipeline import Scored
    from incentive.training.rl import _sample

    example = Example(id="e", prompt="p", reference="4")
    completion = Completion(0, example, "p", [1], [2, 3], "<think>2+2</think><answer>4</answer>")
    scored = Scored(
        [1.5],
        {"nover_reasoning": [1.0]},
        {
            "nover_reasoning/ppl": [1.7],
            "nover_reasoning/rank": [1.0],
            "nover_efficiency/reasoning_tokens": [math.nan],
        },
        [[]],
        [[]],
    )
    sample = _sample(completion, scored, 0, "2+2")
    assert sample["reasoning"] == "2+2"
    assert sample["details"] == {
        "nover_reasoning": {"ppl": 1.7, "rank": 1.0},
        "nover_efficiency": {"reasoning_tokens": None},
    }
