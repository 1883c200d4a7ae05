"""Where the toolkit keeps caches (outside the repo, overridable with INCENTIVE_CACHE), where a named recipe
lives, and the empty folder a run starts in."""

import os
import shutil
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
"""The bundled recipes; each command other than ``train`` keeps its own in a subfolder named for it."""


def cache_dir() -> Path:
    """Root of the incentive cache (default ~/.cache/incentive)."""
    root = os.environ.get("INCENTIVE_CACHE") or os.path.join(Path.home(), ".cache", "incentive")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def recipe_path(name: str, folder: Path = RECIPES_DIR) -> Path:
    """``name`` as a file where one exists, else the bundled ``folder/name.yaml`` where that exists (the bare path
    otherwise, so the loader's error names what the user typed)."""
    path = Path(name)
    bundled = folder / f"{name}.yaml"
    return bundled if not path.exists() and bundled.exists() else path


def empty_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir`` an empty folder: a non-empty one is refused unless ``overwrite``, which clears it."""
    from incentive.config import ConfigError

    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"run folder {run_dir} is not empty; pass --overwrite to replace it or --run-dir elsewhere")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
