"""Scoring GETER's answers: the label (first word), explanation overlap (ROUGE-L F1 over lower-cased words), and
the ablation's verdict (does the trained graph embedding beat a frozen random one, paired over the same queries)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from incentive.geter.queries import LABELS, Label
from incentive.stats import paired_compare, wilson

WORD = re.compile(r"\w+")


def parse_label(response: str) -> Label | None:
    """The first word, case-insensitive, if it is yes, no or unsure; None (invalid) otherwise."""
    words = WORD.findall(response)
    first = words[0].lower() if words else ""
    return next((label for label in LABELS if label == first), None)


def explanation(response: str) -> str:
    """What follows the first word (the label), punctuation after it dropped."""
    match = WORD.search(response)
    return response[match.end() :].lstrip(" .,:;!-\n") if match else ""


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1: with L the longest common subsequence of the two word sequences, 2PR / (P + R) where
    P = L / len(candidate) and R = L / len(reference); 0 when either is empty."""
    a = [w.lower() for w in WORD.findall(candidate)]
    b = [w.lower() for w in WORD.findall(reference)]
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    common = row[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def score(response: str, reference: str, label: Label) -> dict[str, Any]:
    """One answer: its parsed label, whether it is right, and its explanation's ROUGE-L against the reference's."""
    said = parse_label(response)
    return {
        "predicted": said,
        "correct": said == label,
        "rouge_l": rouge_l(explanation(response), explanation(reference)),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Label accuracy (with its 95 % Wilson interval), accuracy per gold label, invalid share, mean ROUGE-L."""
    n = len(rows)
    right = sum(r["correct"] for r in rows)
    low, high = wilson(right, n)
    summary: dict[str, Any] = {
        "queries": n,
        "label_accuracy": right / n,
        "label_accuracy_ci": [low, high],
        "invalid_rate": sum(r["predicted"] is None for r in rows) / n,
        "rouge_l": sum(r["rouge_l"] for r in rows) / n,
    }
    for label in LABELS:
        mine = [r for r in rows if r["label"] == label]
        if mine:
            summary[f"accuracy/{label}"] = sum(r["correct"] for r in mine) / len(mine)
    return summary


def ablation_verdict(
    trained: Sequence[bool], random: Sequence[bool], baseline: str = "a frozen random embedding"
) -> dict[str, Any]:
    """Trained graph embedding against ``baseline`` (by default the frozen random one) on the same queries: the
    accuracy difference, its 95 % interval, McNemar's exact p, and whether the trained one is better at 5 %;
    when it is not, the graph token's training is not shown to matter (the baseline scores as well)."""
    paired = paired_compare([(int(r), 1) for r in random], [(int(t), 1) for t in trained])
    better = paired.diff > 0 and paired.significant
    return {
        "diff": paired.diff,
        "ci": [paired.low, paired.high],
        "p_value": paired.p_value,
        "trained_better": better,
        "verdict": f"the trained graph embedding beats {baseline}"
        if better
        else f"{baseline} scores as well as the trained one: the graph training is not shown to matter",
    }
