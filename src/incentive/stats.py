"""Uncertainty of eval results: 95 % intervals of a correct-rate over prompts, and paired comparisons of two evals
over the same prompts. Standard library only (the normal quantile is ``statistics.NormalDist``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

WILSON = "Wilson score"
CLUSTERED = "Wilson score at the cluster-robust effective sample size (samples clustered by prompt)"
MCNEMAR = "McNemar exact (binomial)"
SIGN = "exact sign test on per-prompt accuracy differences"
AGRESTI_MIN = "Agresti-Min adjusted Wald interval for paired proportions"
PAIRED_NORMAL = "normal interval of the mean per-prompt difference"


def z_value(confidence: float = 0.95) -> float:
    """The two-sided standard normal quantile, 1.959964 for 95 %."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: stays inside [0, 1] and has width even at 0 or n successes.
    ``n`` may be fractional (an effective sample size)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson needs 0 <= successes <= n and n > 0, got {successes}/{n}")
    z = z_value(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Interval:
    """A rate, its interval, and how the interval was computed (``n_eff``: the sample size Wilson was given)."""

    rate: float
    low: float
    high: float
    method: str
    n_eff: float


def rate_interval(counts: Sequence[tuple[int, int]], confidence: float = 0.95) -> Interval:
    """Share of successes over prompts given as (successes, samples) pairs, with its interval.

    One sample per prompt: Wilson. Several: samples of a prompt are correlated, so Wilson is given the effective
    sample size N / deff, where the design effect deff is the cluster-robust (CR1) variance of the rate over the
    binomial one, at least 1; when every sample agrees (rate 0 or 1) each prompt counts once."""
    if not counts:
        raise ValueError("no prompts to take a rate over")
    total = sum(m for _, m in counts)
    hits = sum(k for k, _ in counts)
    rate = hits / total
    if all(m == 1 for _, m in counts):
        low, high = wilson(hits, total, confidence)
        return Interval(rate, low, high, WILSON, float(total))
    prompts = len(counts)
    if rate in (0.0, 1.0) or prompts < 2:
        n_eff = float(prompts)
    else:
        robust = prompts / (prompts - 1) * sum((k - rate * m) ** 2 for k, m in counts) / total**2
        deff = max(1.0, robust * total / (rate * (1 - rate)))
        n_eff = total / deff
    low, high = wilson(rate * n_eff, n_eff, confidence)
    return Interval(rate, low, high, CLUSTERED, n_eff)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: 2 · P(X <= min(wins, losses)) for X ~ Binomial(wins + losses, 1/2), at most 1.
    On paired 0/1 outcomes (one sample per prompt) this is McNemar's exact test."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got {wins}, {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def agresti_min(a_only: int, b_only: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval of p_B − p_A for paired 0/1 outcomes on ``n`` prompts, ``a_only`` right only under A and
    ``b_only`` only under B: Wald after adding 1/2 to each of the four cells (Agresti & Min, 2005)."""
    if n <= 0 or a_only < 0 or b_only < 0 or a_only + b_only > n:
        raise ValueError(f"need 0 <= a_only + b_only <= n, got {a_only}, {b_only}, {n}")
    size = n + 2
    a, b = a_only + 0.5, b_only + 0.5
    diff = (b - a) / size
    se = math.sqrt((a + b) - (b - a) ** 2 / size) / size
    z = z_value(confidence)
    return max(-1.0, diff - z * se), min(1.0, diff + z * se)


@dataclass(frozen=True)
class Paired:
    """B − A on the same prompts: each side's rate, the difference with its interval, and the paired test."""

    prompts: int
    rate_a: float
    rate_b: float
    diff: float
    low: float
    high: float
    interval: str
    b_better: int
    a_better: int
    p_value: float
    test: str

    @property
    def significant(self) -> bool:
        """Significant at 5 % by the paired test (the interval, computed apart, may straddle 0 at the edge)."""
        return self.p_value < 0.05


def paired_compare(
    a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]], confidence: float = 0.95
) -> Paired:
    """Compare per-prompt (successes, samples) of A and B, prompt i of A paired with prompt i of B.

    Each prompt weighs the same: the rates are means of per-prompt rates (the share of samples when every prompt
    has as many). One sample per prompt on both sides: Agresti-Min interval and McNemar's exact test. Otherwise:
    normal interval of the mean per-prompt difference and the sign test over prompts (ties dropped)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same, non-zero number of prompts on both sides, got {len(a)}, {len(b)}")
    rates_a = [k / m for k, m in a]
    rates_b = [k / m for k, m in b]
    n = len(a)
    diffs = [y - x for x, y in zip(rates_a, rates_b, strict=True)]
    diff = sum(diffs) / n
    b_better = sum(d > 0 for d in diffs)
    a_better = sum(d < 0 for d in diffs)
    p_value = sign_test(b_better, a_better)
    if all(m == 1 for _, m in (*a, *b)):
        low, high = agresti_min(a_better, b_better, n, confidence)
        interval, test = AGRESTI_MIN, MCNEMAR
    else:
        sd = math.sqrt(sum((d - diff) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
        half = z_value(confidence) * sd / math.sqrt(n)
        low, high = max(-1.0, diff - half), min(1.0, diff + half)
        interval, test = PAIRED_NORMAL, SIGN
    return Paired(
        n, sum(rates_a) / n, sum(rates_b) / n, diff, low, high, interval, b_better, a_better, p_value, test
    )
