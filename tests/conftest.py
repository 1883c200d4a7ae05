import os
from contextlib import contextmanager

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """The tiny random model and its tokenizer (built once into the cache)."""
    from incentive.models import load_model, load_tokenizer

    return load_model("tiny-random"), load_tokenizer("tiny-random")


LINEAR_BACKENDS = ("mkl", "onednn")
"""The CPU backends a model's linear layers can run on (``model.onednn``): which one a machine gets by default
depends on its CPU's vendor, so tests of code that reads linear layers run under both on every machine."""


@pytest.fixture(scope="session", params=LINEAR_BACKENDS)
def linear_backend(request) -> str:
    """Each linear backend in turn (skipped where this torch build has no oneDNN)."""
    from incentive.models.onednn import onednn_available

    if request.param == "onednn" and not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    return request.param


@pytest.fixture(scope="session")
def tiny_each_backend(linear_backend):
    """The tiny random model with its linear layers on each backend in turn, and its tokenizer."""
    from incentive.models import load_model, load_tokenizer

    return load_model("tiny-random", onednn=linear_backend == "onednn"), load_tokenizer("tiny-random")


@pytest.fixture(params=("kernels-on", "kernels-off"))
def kernels(request, monkeypatch):
    """Each test runs with the kernels of :mod:`incentive.kernels` on (skipped, saying why, where they cannot be
    built) and off (PyTorch's ops), so a path that silently falls back is caught wherever the suite runs."""
    from incentive.kernels import build

    if request.param == "kernels-off":
        monkeypatch.setattr(build, "kernel_ops", lambda: None)
        return False
    if build.kernel_ops() is None:
        pytest.skip(f"kernels unavailable: {build.unavailable_reason()}")
    return True


@pytest.fixture
def crash_at(monkeypatch):
    """``with crash_at(Trainer, n): run.execute()``: ``Trainer.step`` raises KeyboardInterrupt (a simulated kill)
    when it reaches step ``n``; the block expects that interrupt, and the method is restored after it."""

    @contextmanager
    def crashing(trainer_class, at):
        original = trainer_class.step

        def step(self, step):
            if step == at:
                raise KeyboardInterrupt("simulated crash")
            return original(self, step)

        monkeypatch.setattr(trainer_class, "step", step)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(trainer_class, "step", original)

    return crashing
