"""GUI-G1's box rewards (spec: methods/gui-g1.md §3) for answers that are a box [x1, y1, x2, y2]: centre hit,
IoU, and the box-size constraint (closeness of each edge to the reference edge). The paper's total is
R_hit + 0.25·R_IoU + 0.125·R_box: give the three parts those weights in the recipe. A completion without a box
scores 0 on every part; the reference box is the example's reference, the image size ``metadata.width/height``."""

from __future__ import annotations

import ast
import json
import math
import re
from abc import abstractmethod
from typing import Any

from incentive.data.example import Example
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch

Box = tuple[float, float, float, float]
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_SPANS = (re.compile(r"\[.*\]", re.DOTALL), re.compile(r"\{.*\}", re.DOTALL))


def parse_box(text: str) -> Box | None:
    """The first box in a text: a JSON list whose first element has ``bbox_2d`` (the paper's format), an object
    with ``bbox_2d``, or a bare list of four numbers, optionally in a ```json fence; None if there is none."""
    fenced = _FENCE.search(text)
    body = (fenced.group(1) if fenced else text).strip()
    candidates = [body] + [m.group(0) for pattern in _SPANS if (m := pattern.search(body))]
    for candidate in candidates:
        box = _as_box(_literal(candidate))
        if box is not None:
            return box
    return None


def _literal(text: str) -> Any:
    """JSON, else a Python literal (models write single quotes); never code."""
    try:
        return json.loads(text)
    except ValueError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None


def _as_box(value: Any) -> Box | None:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        value = value[0]
    if isinstance(value, dict):
        value = value.get("bbox_2d")
    if not isinstance(value, list | tuple) or len(value) != 4:
        return None
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        return None
    x1, y1, x2, y2 = (float(x) for x in value)
    return x1, y1, x2, y2


def hit(pred: Box, gt: Box) -> float:
    """1 if the predicted box's centre lies in the reference box (edges included)."""
    cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return float(gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3])


def iou(pred: Box, gt: Box) -> float:
    """Intersection over union of two boxes (continuous coordinates)."""
    inter = max(0.0, min(pred[2], gt[2]) - max(pred[0], gt[0])) * max(
        0.0, min(pred[3], gt[3]) - max(pred[1], gt[1])
    )
    area = max(0.0, pred[2] - pred[0]) * max(0.0, pred[3] - pred[1])
    union = area + (gt[2] - gt[0]) * (gt[3] - gt[1]) - inter
    return inter / union if union > 0 else 0.0


def closeness(pred: Box, gt: Box, width: float, height: float) -> float:
    """Harmonic mean of the edge closenesses s = 1 − |gt − pred| / D (D = width for x, height for y); an edge a
    full image dimension off (or more) makes it 0 (spec pitfall 1)."""
    sizes = (width, height, width, height)
    scores = [1 - abs(g - p) / d for p, g, d in zip(pred, gt, sizes, strict=True)]
    if min(scores) <= 0:
        return 0.0
    return 4 / sum(1 / s for s in scores)


def _positive(value: Any) -> bool:
    """A positive finite number, or text that reads as one (CSV cells are text)."""
    if isinstance(value, bool):
        return False
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0


class BoxReward(Reward):
    """Parses the predicted and reference boxes; a missing prediction scores 0, a bad reference fails."""

    @abstractmethod
    def score(self, pred: Box, gt: Box, example: Example) -> float: ...

    def data_problems(self, example: Example) -> list[str]:
        if parse_box(example.reference) is None:
            return [f"needs the reference to be a box [x1, y1, x2, y2], got {example.reference!r}"]
        return []

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        scores: list[float] = []
        reasons: list[str | None] = []
        for c, parsed in zip(batch, ctx.parsed(batch), strict=True):
            gt = parse_box(c.example.reference)
            pred = parse_box(parsed.answer if parsed.answer is not None else c.text)
            if gt is None:
                scores.append(math.nan)
                reasons.append(f"reference {c.example.reference!r} is not a box")
            elif pred is None:
                scores.append(0.0)
                reasons.append("no box in the answer")
            else:
                scores.append(self.score(pred, gt, c.example))
                reasons.append(None)
        return RewardResult(scores, reasons)


@REWARDS.register("box_hit")
class BoxHit(BoxReward):
    """R_hit: the predicted centre is inside the reference box."""

    def score(self, pred: Box, gt: Box, example: Example) -> float:
        return hit(pred, gt)


@REWARDS.register("box_iou")
class BoxIoU(BoxReward):
    """R_IoU: intersection over union with the reference box."""

    def score(self, pred: Box, gt: Box, example: Example) -> float:
        return iou(pred, gt)


@REWARDS.register("box_closeness")
class BoxCloseness(BoxReward):
    """R_box, the box-size constraint: every edge close to the reference edge, relative to the image size."""

    def data_problems(self, example: Example) -> list[str]:
        problems = super().data_problems(example)
        if not all(_positive(example.metadata.get(key)) for key in ("width", "height")):
            problems.append("needs the screen size as positive numbers in 'width' and 'height' columns")
        return problems

    def score(self, pred: Box, gt: Box, example: Example) -> float:
        meta = example.metadata
        if "width" not in meta or "height" not in meta:
            raise ValueError(f"example '{example.id}' needs metadata width and height for box_closeness")
        return closeness(pred, gt, float(meta["width"]), float(meta["height"]))
