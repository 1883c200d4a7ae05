"""Rollout engines: prompts in, grouped completions with token ids and logprobs out, chosen by name."""

from incentive.engines.cached import CachedEngine
from incentive.engines.hf import HFEngine, SamplingParams
from incentive.registry import Registry

ENGINES: Registry[type[HFEngine] | type[CachedEngine]] = Registry("engine")
ENGINES.register("hf")(HFEngine)
ENGINES.register("cached")(CachedEngine)

__all__ = ["ENGINES", "CachedEngine", "HFEngine", "SamplingParams"]
