import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """The tiny random model and its tokenizer (built once into the cache)."""
    from incentive.models import load_model, load_tokenizer

    return load_model("tiny-random"), load_tokenizer("tiny-random")
