"""Text stand-ins for Pixel Reasoner's pixel-space operations: ``crop_grid`` zooms into a digit grid the prompt
shows only coarsely (its ``crop_image_normalized``), ``select_frames`` picks frames of a text "video"."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from incentive.data.example import Example
from incentive.tools.base import TOOLS, Tool, ToolError


def _number_list(arguments: dict[str, Any], key: str, size: int | None = None) -> list[float]:
    value = arguments.get(key)
    ok = isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )
    if not ok or (size is not None and len(value) != size):
        shape = f"a list of {size} numbers" if size is not None else "a list of numbers"
        raise ToolError(f"'{key}' must be {shape}, got {value!r}")
    return [float(v) for v in value]


def _hidden(example: Example, key: str) -> Sequence[Any]:
    value = example.metadata.get(key)
    if not isinstance(value, list) or not value:
        raise ToolError(f"this example has no {key} to operate on")
    return value


def crop_box(bbox: Sequence[float], width: int, height: int, pad: float) -> tuple[int, int, int, int]:
    """Cell range [c1, c2) × [r1, r2) of a box: normalised in [0, 1], or in cells when any value is 1 or more
    (the release's pixel rule; then divided by the grid size); padded by ``pad`` on each side and clamped."""
    x1, y1, x2, y2 = bbox
    if max(bbox) >= 1:
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    if x2 <= x1 or y2 <= y1:
        raise ToolError(f"the box {list(bbox)} is empty: need x1 < x2 and y1 < y2")
    x1, y1 = max(0.0, x1 - pad), max(0.0, y1 - pad)
    x2, y2 = min(1.0, x2 + pad), min(1.0, y2 + pad)
    c1, c2 = math.floor(x1 * width + 1e-9), math.ceil(x2 * width - 1e-9)
    r1, r2 = math.floor(y1 * height + 1e-9), math.ceil(y2 * height - 1e-9)
    return c1, r1, c2, r2


@TOOLS.register("crop_grid")
class CropGrid(Tool):
    """``{"bbox_2d": [x1, y1, x2, y2]}`` → the full-resolution cells of that box, rows and columns numbered from
    1. The example's ``metadata["grid"]`` holds the rows (strings of digits, or lists). Like the released crop, the
    box is padded by 0.1 and a crop under ``min_cells`` on a side is an error (their 28 px)."""

    def __init__(self, pad: float = 0.1, min_cells: int = 2) -> None:
        self.pad = pad
        self.min_cells = min_cells

    def __call__(self, arguments: dict[str, Any], example: Example) -> str:
        rows = [
            list(str(r).replace(" ", "")) if isinstance(r, str) else list(r) for r in _hidden(example, "grid")
        ]
        height, width = len(rows), len(rows[0])
        c1, r1, c2, r2 = crop_box(_number_list(arguments, "bbox_2d", 4), width, height, self.pad)
        if c2 - c1 < self.min_cells or r2 - r1 < self.min_cells:
            raise ToolError(
                f"the crop is {c2 - c1}x{r2 - r1} cells, smaller than the minimum "
                f"{self.min_cells}x{self.min_cells}"
            )
        lines = [f"Here is the cropped grid (rows {r1 + 1}-{r2}, columns {c1 + 1}-{c2}):"]
        lines += [f"row {r + 1}: " + " ".join(str(x) for x in rows[r][c1:c2]) for r in range(r1, r2)]
        return "\n".join(lines)


@TOOLS.register("select_frames")
class SelectFrames(Tool):
    """``{"target_frames": [i, …]}`` (numbered from 1) → those frames of ``metadata["frames"]``; at most
    ``max_frames`` per call, as in the release (8 of 16)."""

    def __init__(self, max_frames: int = 8) -> None:
        self.max_frames = max_frames

    def __call__(self, arguments: dict[str, Any], example: Example) -> str:
        frames = _hidden(example, "frames")
        wanted = _number_list(arguments, "target_frames")
        if not wanted:
            raise ToolError("select at least one frame")
        if len(wanted) > self.max_frames:
            raise ToolError(f"at most {self.max_frames} frames per call, got {len(wanted)}")
        bad = [int(i) for i in wanted if i != int(i) or not 1 <= i <= len(frames)]
        if bad:
            raise ToolError(f"frames {bad} do not exist: the video has frames 1-{len(frames)}")
        lines = ["Here are the selected frames:"]
        lines += [f"frame {int(i)}: {frames[int(i) - 1]}" for i in wanted]
        return "\n".join(lines)
