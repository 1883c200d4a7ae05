"""Rollout engines: prompts in, grouped completions with token ids and logprobs out, chosen by name."""

from incentive.engines.base import Engine, SamplingParams
from incentive.engines.cached import CachedEngine
from incentive.engines.hf import HFEngine
from incentive.engines.vllm import VLLMEngine
from incentive.registry import Registry

ENGINES: Registry[type[Engine]] = Registry("engine")
ENGINES.register("hf")(HFEngine)
ENGINES.register("cached")(CachedEngine)
ENGINES.register("vllm")(VLLMEngine)

__all__ = ["ENGINES", "CachedEngine", "Engine", "HFEngine", "SamplingParams", "VLLMEngine"]
