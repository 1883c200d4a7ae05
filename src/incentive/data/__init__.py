"""Examples and where they come from: files (jsonl, csv, parquet), procedural reasoning-gym tasks and
incentive's own tasks (importing this package registers them)."""

from incentive.data import freeform as _freeform  # noqa: F401
from incentive.data.config import DataConfig
from incentive.data.example import DataError, Example
from incentive.data.fit import fit_to_context, keep_usable
from incentive.data.loaders import LoadResult, load_examples
from incentive.data.solutions import MissingSolutions, sft_pairs

__all__ = [
    "DataConfig",
    "DataError",
    "Example",
    "LoadResult",
    "MissingSolutions",
    "fit_to_context",
    "keep_usable",
    "load_examples",
    "sft_pairs",
]
