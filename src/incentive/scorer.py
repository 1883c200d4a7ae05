"""A batched, gradient-free logprob scorer over named models ("policy", "proxy", ...), handed to rewards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from transformers import PreTrainedModel

from incentive.logprob_backends import Fused, LogprobBackend

ModelView = Callable[[], AbstractContextManager[PreTrainedModel]]


class ModelScorer:
    """Scores targets after contexts with whichever model view is named; views are context managers so a
    LoRA proxy can switch adapters on the shared base weights only for the duration of the call."""

    def __init__(
        self, views: dict[str, ModelView], max_tokens: int = 4096, backend: LogprobBackend | None = None
    ) -> None:
        self.views = views
        self.max_tokens = max_tokens
        self.backend = backend or Fused()

    def logprobs(
        self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], model: str = "proxy"
    ) -> list[torch.Tensor]:
        if model not in self.views:
            raise KeyError(f"no model '{model}' to score with; have: {', '.join(sorted(self.views))}")
        with self.views[model]() as net, torch.no_grad():
            was_training = net.training
            net.eval()
            try:
                return self.backend.score(net, contexts, targets, self.max_tokens)
            finally:
                net.train(was_training)
