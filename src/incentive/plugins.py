"""User plugins: the modules a recipe's ``imports`` names, imported before the rest of the recipe is checked, so
the parts they register with the package's own decorators (rewards, estimators, hooks, templates, engines, ...)
are known by name without editing the package."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import traceback
from pathlib import Path

SKIPPED_DIRS = (Path(__file__).resolve().parent, Path(importlib.__file__).resolve().parent)
"""Where an import error's frames are not the plugin's: this package and Python's import machinery."""
MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def import_plugin(entry: str, base: Path) -> str:
    """Import ``entry``: a ``.py`` file (a path, relative to ``base``) or a dotted module name, imported as Python
    imports it. Returns what a run records for it (a file's absolute path, else the name), so that a resumed run
    imports the same code; each is imported once per process. A failure is a one-line ValueError naming ``entry``."""
    if entry.endswith(".py") or "/" in entry or "\\" in entry:
        return _import_file(entry, base)
    if not MODULE_NAME.fullmatch(entry):
        raise ValueError(f"'{entry}' is neither a .py file nor a module name like my_package.rewards")
    try:
        importlib.import_module(entry)
    except ModuleNotFoundError as err:
        if err.name is None or not (entry == err.name or entry.startswith(f"{err.name}.")):
            raise ValueError(_failure(entry, err)) from err
        raise ValueError(
            f"cannot import '{entry}': no module named '{err.name}' among the installed packages and PYTHONPATH "
            "(name a file by its path, e.g. my_rewards.py)"
        ) from err
    except Exception as err:  # the plugin's own code failed: report it in one line, whatever it raised
        raise ValueError(_failure(entry, err)) from err
    return entry


def _import_file(entry: str, base: Path) -> str:
    """Import the file ``entry`` names as a module named after its path (so two files with one name do not
    clash); its absolute path."""
    path = (base / Path(entry).expanduser()).resolve()
    if not path.is_file():
        raise ValueError(f"cannot import '{entry}': no file {path}")
    stem = re.sub(r"\W", "_", path.stem)
    name = f"incentive_plugin_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return str(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import '{entry}': {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as Python's import does (dataclasses look their module up)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the plugin's own code failed: report it in one line, whatever it raised
        del sys.modules[name]
        raise ValueError(_failure(entry, err)) from err
    return str(path)


def _failure(entry: str, err: BaseException) -> str:
    """``cannot import 'ENTRY': Error: message (at file, line N)``: the line is the last one the error passed
    outside this package and Python's import machinery, the plugin's own where it raised or called from."""
    frames = [
        frame
        for frame in traceback.extract_tb(err.__traceback__)
        if not frame.filename.startswith("<")
        and not any(Path(frame.filename).resolve().is_relative_to(folder) for folder in SKIPPED_DIRS)
    ]
    if isinstance(err, SyntaxError) and err.filename:
        where = f" (at {err.filename}, line {err.lineno})"
    else:
        where = f" (at {frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    message = err.msg if isinstance(err, SyntaxError) else str(err)
    return f"cannot import '{entry}': {type(err).__name__}: {message}{where}"
