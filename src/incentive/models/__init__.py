"""Model and tokenizer loading: the embedded default, a tiny random test model, any local/HF model."""

from incentive.models.loading import ModelLoadError, context_length, load_model, load_tokenizer

__all__ = ["ModelLoadError", "context_length", "load_model", "load_tokenizer"]
