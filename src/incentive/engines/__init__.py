"""Rollout engines: prompts in, grouped completions with token ids and logprobs out."""

from incentive.engines.hf import HFEngine, SamplingParams

__all__ = ["HFEngine", "SamplingParams"]
