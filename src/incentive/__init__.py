"""incentive: R1-Zero-style incentive training (GRPO family, NOVER) for language models."""

__version__ = "0.1.0"
