"""Rule verifier: the final answer from answer tags or the last \\boxed{}, checked by reasoning-gym's own scorer for
its tasks, else by choice, numeric, math-verify or normalized-string matching, every check under a time limit.

A check never crashes a run: a missing or unparsable answer, a checker error and a timeout are all scored 0 with a
reason. The time limit is a SIGALRM timer on the main thread (free), and a helper process off it (math-verify's
own timeouts use signals and fail off the main thread; a hung thread cannot be stopped, a process can).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import re
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, TypeVar

from incentive.data.example import Example
from incentive.rewards.base import REWARDS, Reward, RewardContext, RewardResult
from incentive.rollout.types import RolloutBatch

T = TypeVar("T")
AnswerKind = Literal["auto", "math", "numeric", "choice", "string"]
MAX_ANSWER_CHARS = 2000
"""Longer answers are scored 0 unread: no honest final answer is that long, and parsers can blow up on them."""

# metadata["answer_type"] (ours, or WebInstruct-style names) → how the answer is checked
_KIND_ALIASES: dict[str, AnswerKind] = {
    "auto": "auto",
    "math": "math",
    "expression": "math",
    "fraction": "math",
    "matrix": "math",
    "list": "math",
    "numeric": "numeric",
    "number": "numeric",
    "float": "numeric",
    "integer": "numeric",
    "percentage": "numeric",
    "choice": "choice",
    "multiple choice": "choice",
    "string": "string",
    "boolean": "string",
}


class CheckTimeout(BaseException):
    """A check ran past its limit. A BaseException, so library code's ``except Exception`` cannot swallow it."""


@dataclass(frozen=True)
class Verdict:
    """One answer checked: score in [0, 1], the extracted answer, and why it is 0 when not simply wrong."""

    score: float
    answer: str | None = None
    reason: str | None = None

    @property
    def correct(self) -> bool:
        return self.score >= 1.0


# -- extraction ------------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (any nesting depth); None when there is none or it never closes."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{") : i].strip()
    return None


def extract_answer(text: str, tagged: str | None) -> str | None:
    """The answer a completion gives: its answer block (unboxed if it holds a box), else its last \\boxed{}."""
    if tagged is not None:
        inner = last_boxed(tagged)
        return tagged if inner is None else inner
    return last_boxed(text)


# -- matching --------------------------------------------------------------------------------------------------

_TEXT_MACRO = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,!;: ]|\\quad|\\qquad|~|\\left|\\right|\\displaystyle")
_UNITS = {
    "meter": "m",
    "metre": "m",
    "centimeter": "cm",
    "centimetre": "cm",
    "millimeter": "mm",
    "kilometer": "km",
    "kilometre": "km",
    "gram": "g",
    "kilogram": "kg",
    "second": "s",
    "sec": "s",
    "minute": "min",
    "hour": "h",
    "hr": "h",
    "degree": "°",
    "deg": "°",
    "dollar": "$",
    "percent": "%",
    "liter": "l",
    "litre": "l",
}
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?"
_QUANTITY = re.compile(rf"^(?P<num>{_NUMBER})(?:\s*/\s*(?P<den>{_NUMBER}))?\s*(?P<unit>\S.{{0,24}})?$")
_UNIT_TOKEN = re.compile(r"[a-zµ]+")
_SHORT_UNITS = {"m", "cm", "mm", "km", "g", "kg", "mg", "s", "ms", "h", "l", "ml", "j", "w", "v", "hz"}
"""Unit symbols of one or two letters; other one- or two-letter suffixes are algebra (``3x``), not units."""
_MATH_WORDS = {
    "sin",
    "cos",
    "tan",
    "cot",
    "sec",
    "csc",
    "log",
    "exp",
    "sqrt",
    "infty",
    "arcsin",
    "arccos",
    "arctan",
}
_LETTER = re.compile(
    r"^(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*:?\s*)?"
    r"(?:\(([a-z])\)|([a-z])(?:[.:)]|$))"
)


def normalize(text: str) -> str:
    """Lower-cased answer text without TeX decoration, dollar signs, spacing or a trailing period."""
    text = _TEXT_MACRO.sub(r"\1", text).replace("\u2212", "-")
    text = _SPACING.sub(" ", text).replace("\\%", "%").replace("\\$", "$").replace("$", "")
    text = re.sub(r"\^\s*\{?\\circ\}?", "°", text)
    text = re.sub(r"\s+", " ", text).strip().rstrip(".").strip()
    return text.lower()


def parse_quantity(text: str) -> tuple[float, str | None] | None:
    """A plain number, fraction or percentage with an optional unit, e.g. ``"1,200 m"`` → (1200.0, "m");
    None for anything else (``3x`` is algebra, not 3 of unit x)."""
    match = _QUANTITY.match(normalize(text))
    if match is None:
        return None
    unit = _unit(match["unit"].rstrip(".").strip()) if match["unit"] else None
    if match["unit"] and unit is None:
        return None
    value = float(match["num"].replace(",", ""))
    if match["den"] is not None:
        den = float(match["den"].replace(",", ""))
        if den == 0:
            return None
        value /= den
    return value, unit


def _unit(text: str) -> str | None:
    """The canonical unit (``meters`` → ``m``), or None when the text is not unit-like."""
    if text in ("%", "°", "percent"):
        return "%" if text == "percent" else text
    tokens = _UNIT_TOKEN.findall(text)
    if not tokens or re.fullmatch(r"[a-zµ°0-9/^ .*·-]+", text) is None:
        return None
    canonical = []
    for token in tokens:
        singular = token[:-1] if len(token) > 3 and token.endswith("s") else token
        word = _UNITS.get(token) or _UNITS.get(singular) or singular
        if len(word) < 3 and word not in _SHORT_UNITS and word not in _UNITS.values():
            return None
        canonical.append(word)
    return "/".join(canonical) if "/" in text else " ".join(canonical)


def numbers_match(reference: str, answer: str, rel_tol: float = 1e-6) -> bool | None:
    """Equal within tolerance with compatible units (a missing unit is fine, 75% also equals 0.75); None when
    either side is not a plain quantity."""
    ref, ans = parse_quantity(reference), parse_quantity(answer)
    if ref is None or ans is None:
        return None
    (a, unit_a), (b, unit_b) = ref, ans

    def close(x: float, y: float) -> bool:
        return math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)

    if unit_a is not None and unit_b is not None and unit_a != unit_b:
        return False
    if close(a, b):
        return True
    if {unit_a, unit_b} != {"%", None}:
        return False
    return close(a / 100, b) if unit_a == "%" else close(a, b / 100)


def _choice_letters(choices: Sequence[str] | dict[str, str]) -> dict[str, str]:
    """letter → normalized option text; a list gets the letters A, B, C, … in order."""
    items = (
        choices.items()
        if isinstance(choices, dict)
        else zip("abcdefghijklmnopqrstuvwxyz", choices, strict=False)
    )
    return {str(letter).strip().lower(): normalize(str(text)) for letter, text in items}


def choice_letter(text: str, options: dict[str, str]) -> str | None:
    """The option an answer names: by its text, else by its letter (``B``, ``(b)``, ``B.``, ``Option B: …``).
    With no options given, any letter counts."""
    norm = normalize(text)
    for letter, option in options.items():
        if norm == option:
            return letter
    match = _LETTER.match(norm)
    letter = (match[1] or match[2]) if match else None
    return letter if letter is not None and (not options or letter in options) else None


def _is_text(reference: str) -> bool:
    """Words, not math: math-verify would read "Paris" as the product p·a·r·i·s and accept "Pairs"."""
    norm = normalize(reference)
    words = re.findall(r"[a-z]{3,}", norm)
    return re.fullmatch(r"[a-z .,'()-]+", norm) is not None and any(w not in _MATH_WORDS for w in words)


def math_equal(reference: str, answer: str) -> bool | None:
    """Mathematical equivalence by math-verify; None when either side does not parse. No time limit of its own:
    callers run it under :func:`run_limited` (math-verify's signal timeouts break off the main thread)."""
    from math_verify import parse, verify

    def read(text: str) -> list[Any]:
        latex = f"${text.replace('$', '')}$"
        return parse(latex, fallback_mode="no_fallback", parsing_timeout=None)  # type: ignore[arg-type]

    gold, pred = read(reference), read(answer)
    if not gold or not pred:
        return None
    return bool(verify(gold, pred, allow_set_relation_comp=True, timeout_seconds=None))


def check_answer(
    reference: str,
    answer: str,
    kind: AnswerKind = "auto",
    choices: Sequence[str] | dict[str, str] | None = None,
    rel_tol: float = 1e-6,
) -> Verdict:
    """Compare one extracted answer with the reference (no time limit here; see :class:`RuleVerifier`)."""
    if not answer.strip():
        return Verdict(0.0, answer, "empty answer")
    if len(answer) > MAX_ANSWER_CHARS:
        return Verdict(0.0, answer, f"answer too long ({len(answer)} characters)")
    if normalize(reference) == normalize(answer):
        return Verdict(1.0, answer)
    if choices or kind == "choice":
        options = _choice_letters(choices or {})
        picked = choice_letter(answer, options)
        if picked is None:
            return Verdict(0.0, answer, "answer names none of the choices")
        return Verdict(float(picked == choice_letter(reference, options)), answer)
    if kind == "string" or (kind == "auto" and _is_text(reference)):
        return Verdict(0.0, answer)
    numeric = numbers_match(reference, answer, rel_tol)
    if numeric is not None or kind == "numeric":
        return Verdict(float(bool(numeric)), answer, None if numeric is not None else "not a number")
    equal = math_equal(reference, answer)
    if equal is None:
        return Verdict(0.0, answer, "reference or answer did not parse (math-verify)")
    return Verdict(float(equal), answer)


@cache
def _rg_scorer(task: str) -> Any:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def check_task_answer(task: str, entry: dict[str, Any], answer: str) -> Verdict:
    """reasoning-gym's own scorer for one of its tasks (it may give partial credit)."""
    value = float(_rg_scorer(task)(answer, entry))
    return Verdict(value if math.isfinite(value) else 0.0, answer)


# -- time limit ------------------------------------------------------------------------------------------------


def run_limited(fn: Callable[..., T], args: tuple[Any, ...], seconds: float) -> T:
    """``fn(*args)``, or CheckTimeout after ``seconds``. Off the main thread ``fn`` and its arguments must pickle."""
    on_main = threading.current_thread() is threading.main_thread()
    if on_main and hasattr(signal, "setitimer") and signal.getitimer(signal.ITIMER_REAL)[0] == 0:
        return _with_alarm(fn, args, seconds)
    return _HELPER.run(fn, args, seconds)


def _with_alarm(fn: Callable[..., T], args: tuple[Any, ...], seconds: float) -> T:
    def expire(signum: int, frame: Any) -> None:
        raise CheckTimeout(f"no result within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def _default_sigterm() -> None:
    """In the helper: SIGTERM back to its default action. A parent that ignores it (a CLI on its way out) would
    otherwise leave the helper immune to the kill that ends an overrunning check, and the caller waiting."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _warm() -> None:
    """Import the checkers in the helper before any limit counts."""
    import math_verify  # noqa: F401


class _Helper:
    """One forkserver child that runs checks for other threads; killed and replaced when a check overruns.
    The fork server preloads this module, so a replacement starts in milliseconds, not seconds."""

    def __init__(self) -> None:
        self._pool: Any = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., T], args: tuple[Any, ...], seconds: float) -> T:
        with self._lock:
            if self._pool is None:
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload([__name__, "math_verify"])
                self._pool = ctx.Pool(1, initializer=_default_sigterm)
                self._pool.apply(_warm)
            pending = self._pool.apply_async(fn, args)
            try:
                return pending.get(seconds)
            except multiprocessing.TimeoutError:
                self._pool.terminate()
                self._pool = None
                raise CheckTimeout(f"no result within {seconds:g} s") from None


_HELPER = _Helper()


class _QuietNoTimeout(logging.Filter):
    """math-verify warns once that its own timeout is off; here the caller enforces one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_QuietNoTimeout())


# -- the reward ------------------------------------------------------------------------------------------------


class AnswerReward(Reward):
    """A reward that judges each completion's final answer (the answer block, its ``\\boxed{}`` if it holds one,
    else the last ``\\boxed{}``) on its own, without a model call (:meth:`verify`): so it can also judge logged
    samples and held-out evals. Extras: ``correct``."""

    def verify(self, example: Example, answer: str | None) -> Verdict:
        raise NotImplementedError

    def verdicts(self, batch: RolloutBatch, ctx: RewardContext) -> list[Verdict]:
        return [
            self.verify(c.example, extract_answer(c.text, parsed.answer))
            for c, parsed in zip(batch, ctx.parsed(batch), strict=True)
        ]

    def extras(self, verdicts: list[Verdict]) -> dict[str, list[float]]:
        return {"correct": [float(v.correct) for v in verdicts]}

    def __call__(self, batch: RolloutBatch, ctx: RewardContext) -> RewardResult:
        verdicts = self.verdicts(batch, ctx)
        return RewardResult([v.score for v in verdicts], [v.reason for v in verdicts], self.extras(verdicts))


@REWARDS.register("verifier")
class RuleVerifier(AnswerReward):
    """1 for a correct final answer, 0 otherwise (reasoning-gym tasks may give partial credit); a missing answer,
    a parse failure, a checker error or a timeout is a 0 with a reason.

    Per example, ``metadata["choices"]`` (a list, or letter → text) makes it a multiple-choice check and
    ``metadata["answer_type"]`` (math, numeric, choice, string, or WebInstruct's names) forces a kind."""

    def __init__(self, timeout_s: float = 5.0, rel_tol: float = 1e-6) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.rel_tol = rel_tol

    def verify(self, example: Example, answer: str | None) -> Verdict:
        """Check one extracted answer against ``example.reference`` under the time limit."""
        if answer is None:
            return Verdict(0.0, None, "no answer found")
        meta = example.metadata
        try:
            if "task" in meta and "entry" in meta:
                return run_limited(check_task_answer, (meta["task"], meta["entry"], answer), self.timeout_s)
            kind = _KIND_ALIASES.get(str(meta.get("answer_type", "auto")).lower(), "auto")
            args = (example.reference, answer, kind, meta.get("choices"), self.rel_tol)
            return run_limited(check_answer, args, self.timeout_s)
        except CheckTimeout as err:
            return Verdict(0.0, answer, f"check timed out: {err}")
        except Exception as err:  # a checker bug is a scored outcome, never a crashed run
            return Verdict(0.0, answer, f"checker error: {type(err).__name__}: {err}")

    def extras(self, verdicts: list[Verdict]) -> dict[str, list[float]]:
        return {
            **super().extras(verdicts),
            "timeout": [float(bool(v.reason and v.reason.startswith("check timed out"))) for v in verdicts],
        }
