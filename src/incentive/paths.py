"""Where the toolkit keeps caches: outside the repo, overridable with INCENTIVE_CACHE."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the incentive cache (default ~/.cache/incentive)."""
    root = os.environ.get("INCENTIVE_CACHE") or os.path.join(Path.home(), ".cache", "incentive")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
