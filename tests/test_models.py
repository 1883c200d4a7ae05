import time

import pytest

from incentive.models import ModelLoadError, load_model
from incentive.templates import SingleBlockFormat, TagFormat


def test_hub_id_fails_fast_with_advice():
    start = time.time()
    with pytest.raises(ModelLoadError, match="never downloads"):
        load_model("someone/not-a-real-model-xyz")
    assert time.time() - start < 30


def test_local_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_tiny_model_shares_embedded_tokenizer(tiny):
    model, tokenizer = tiny
    assert model.config.vocab_size == 49152
    assert tokenizer.chat_template
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_tag_formats():
    tags = TagFormat()
    assert tags.parse("<think> a </think>\n<answer>b</answer>").strict
    assert not tags.parse("hi <think>a</think><answer>b</answer>").strict
    inverse = SingleBlockFormat("story", "rubric")
    parsed = inverse.parse("<story>Once upon a time.</story>")
    assert parsed.strict and parsed.reasoning == "Once upon a time." and parsed.answer is None
    assert not inverse.parse("<story>x</story> trailing").strict
    assert inverse.parse(inverse.render("A tale.", "ignored")).strict
