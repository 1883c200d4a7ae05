"""Examples and where they come from: files (jsonl, csv, parquet) and procedural reasoning-gym tasks."""

from incentive.data.example import DataError, Example

__all__ = ["DataError", "Example"]
