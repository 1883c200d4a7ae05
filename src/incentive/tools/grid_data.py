"""The grid-zoom task (Pixel Reasoner's text stand-in): an 8x8 digit grid the prompt shows only as 2x2-block
maxima. Cell questions need ``crop_grid``; block questions are answerable from the coarse view. Each row carries
an SFT trace, some with a failed call that is then repaired.

    python -m incentive.tools.grid_data recipes/data/grid-zoom.jsonl
    python -m incentive.tools.grid_data recipes/data/grid-zoom-eval.jsonl --count 48 --seed 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from incentive.data.example import Example
from incentive.tools.base import CallProtocol, observe
from incentive.tools.grid import CropGrid

SIZE, BLOCK = 8, 2
TOOLS_USED = {"crop_grid": CropGrid()}
CALL_HELP = (
    'To see cells, zoom in with <tool_call>{"name": "crop_grid", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}'
    "</tool_call>, the box in cell edges (columns x, rows y, 0-8)."
)


def _call(box: list[int]) -> str:
    return '<tool_call>{"name": "crop_grid", "arguments": {"bbox_2d": ' + json.dumps(box) + "}}</tool_call>"


def make_row(index: int, rng: random.Random, protocol: CallProtocol) -> dict[str, Any]:
    """One example: prompt, reference, the hidden grid and a worked trace."""
    grid = ["".join(str(rng.randrange(10)) for _ in range(SIZE)) for _ in range(SIZE)]
    blocks = SIZE // BLOCK
    coarse = [
        [
            max(
                grid[r][c]
                for r in range(br * BLOCK, br * BLOCK + BLOCK)
                for c in range(bc * BLOCK, bc * BLOCK + BLOCK)
            )
            for bc in range(blocks)
        ]
        for br in range(blocks)
    ]
    view = "\n".join(f"block row {i + 1}: " + " ".join(row) for i, row in enumerate(coarse))
    head = (
        f"An {SIZE}x{SIZE} grid of digits, shown coarsely: each entry is the largest digit of a {BLOCK}x{BLOCK} "
        f"block.\n{view}\n"
    )
    row: dict[str, Any] = {"id": f"grid-{index}", "grid": grid}
    if rng.random() < 0.25:
        br, bc = rng.randrange(blocks), rng.randrange(blocks)
        question = f"What is the largest digit in block row {br + 1}, block column {bc + 1}?"
        row |= {
            "reference": coarse[br][bc],
            "reasoning": f"Block row {br + 1}, block column {bc + 1} shows {coarse[br][bc]}.",
        }
    else:
        r, c = rng.randrange(SIZE), rng.randrange(SIZE)
        question = f"What digit is at row {r + 1}, column {c + 1}?"
        example = Example(prompt="", reference="", metadata={"grid": grid})
        boxes = [[c + 1, r, c, r + 1]] if rng.random() < 0.2 else []  # a failed call, then the repair
        trace = ""
        for box in [*boxes, [c, r, c + 1, r + 1]]:
            trace += _call(box)
            trace += protocol.response(observe(TOOLS_USED, _call(box), protocol, example)[0])
        trace += f"Row {r + 1}, column {c + 1} is {grid[r][c]}."
        row |= {"reference": grid[r][c], "reasoning": trace}
    row["prompt"] = head + question + " " + CALL_HELP
    return row


def make_rows(count: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    protocol = CallProtocol()
    return [make_row(i, rng, protocol) for i in range(count)]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Write the grid-zoom task as JSON lines.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.count, args.seed)))
    print(f"wrote {args.count} rows to {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
