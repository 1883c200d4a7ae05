"""Worked solutions for SFT cold starts: small models cannot find the output format by RL alone, so a short SFT
stage on programmatically written reasoning comes first."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from incentive.data.example import DataError, Example
from incentive.registry import Registry

if TYPE_CHECKING:  # templates imports transformers (slow) and incentive.data (a cycle)
    from incentive.templates import TagFormat

WORKED_SOLUTIONS: Registry[Callable[[Example], str]] = Registry("worked solution")

_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")


def arithmetic_steps(expression: str) -> tuple[list[str], int]:
    """Evaluate an integer expression as reasoning-gym does (Python precedence, ``/`` is floor division) and
    return one line per operation in evaluation order, e.g. ``["12 + 7 = 19", "19 - 3 = 16"]``, and the value."""
    return _Stepper(expression).run()


class _Stepper:
    """Recursive-descent evaluator that writes down each operation as it performs it."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.tokens: list[str] = []
        position = 0
        while position < len(expression.rstrip()):
            match = _TOKEN.match(expression, position)
            if match is None:
                raise ValueError(f"cannot read arithmetic expression {expression!r} at character {position}")
            self.tokens.append(match.group(1))
            position = match.end()
        self.position = 0
        self.steps: list[str] = []

    def run(self) -> tuple[list[str], int]:
        value = self._sum()
        if self.position != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.position]!r} in {self.expression!r}")
        return self.steps, value

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise ValueError(f"arithmetic expression {self.expression!r} ends too early")
        self.position += 1
        return token

    def _sum(self) -> int:
        value = self._product()
        while self._peek() in ("+", "-"):
            op = self._take()
            value = self._apply(value, op, self._product())
        return value

    def _product(self) -> int:
        value = self._unary()
        while self._peek() in ("*", "/"):
            op = self._take()
            value = self._apply(value, op, self._unary())
        return value

    def _unary(self) -> int:
        token = self._take()
        if token == "-":  # binds tighter than * and /, as in Python
            literal = (self._peek() or "").isdigit()
            value = -self._unary()
            if not literal:
                self.steps.append(f"-({-value}) = {value}")
            return value
        if token == "(":
            value = self._sum()
            if self._take() != ")":
                raise ValueError(f"unbalanced parentheses in {self.expression!r}")
            return value
        if token.isdigit():
            return int(token)
        raise ValueError(f"unexpected {token!r} in {self.expression!r}")

    def _apply(self, left: int, op: str, right: int) -> int:
        if op == "+":
            result = left + right
        elif op == "-":
            result = left - right
        elif op == "*":
            result = left * right
        else:
            if right == 0:
                raise ValueError(f"division by zero in {self.expression!r}")
            result = left // right
        note = " (rounded down)" if op == "/" and left % right else ""
        self.steps.append(f"{left} {op} {right} = {result}{note}")
        return result


def _expression(example: Example) -> str:
    """The expression of a reasoning-gym arithmetic entry, or of a file row with an 'expression' column."""
    entry = example.metadata.get("entry")
    inner = entry.get("metadata") if isinstance(entry, dict) else None
    expression = inner.get("expression") if isinstance(inner, dict) else example.metadata.get("expression")
    if not isinstance(expression, str):
        raise ValueError(f"example '{example.id}' has no arithmetic expression in its metadata")
    return expression


@WORKED_SOLUTIONS.register("chain_sum")
@WORKED_SOLUTIONS.register("basic_arithmetic")
def arithmetic_solution(example: Example) -> str:
    """One line per operation; refuses to write reasoning that disagrees with the reference."""
    steps, value = arithmetic_steps(_expression(example))
    if str(value) != example.reference.strip():
        raise ValueError(
            f"example '{example.id}': worked solution gives {value}, reference is {example.reference}"
        )
    return "\n".join(steps) if steps else str(value)


class MissingSolutions(DataError):
    """SFT data in which no example has a worked solution: the SFT stage has nothing to imitate."""


def solutions_needed() -> str:
    """What SFT data must carry, for error messages."""
    return (
        "SFT needs worked solutions to imitate: a 'reasoning' column, or a task with a worked-solution writer "
        f"(known: {', '.join(WORKED_SOLUTIONS.names())})"
    )


def sft_pairs(examples: Sequence[Example], tags: TagFormat, source: str) -> list[tuple[Example, str]]:
    """(example, target completion) pairs; the reasoning comes from a 'reasoning' metadata string if present,
    else from the worked-solution writer of the example's reasoning-gym task. Data without any solution raises
    MissingSolutions (one line, so a run can refuse or skip SFT before any model loads); a row without one, or
    whose written solution disagrees with its reference, raises DataError naming ``source`` and the row."""
    if examples and not any(_has_solution(example) for example in examples):
        tasks = sorted({str(e.metadata["task"]) for e in examples if e.metadata.get("task")})
        has = f"task {', '.join(tasks)} has no writer" if tasks else "no task"
        problem = f"{solutions_needed()}; this data has no 'reasoning' and {has}"
        raise MissingSolutions(source, None, None, problem)
    pairs = []
    for example in examples:
        if not _has_solution(example):
            raise DataError(source, example.row, "reasoning", f"missing or empty ({solutions_needed()})")
        try:
            pairs.append((example, tags.render(_reasoning(example), example.reference)))
        except ValueError as err:
            raise DataError(source, example.row, None, f"no worked solution: {err}") from err
    return pairs


def _has_solution(example: Example) -> bool:
    """A non-empty 'reasoning' string, or a task whose worked solutions can be written."""
    reasoning, task = example.metadata.get("reasoning"), example.metadata.get("task")
    return (isinstance(reasoning, str) and bool(reasoning.strip())) or (
        isinstance(task, str) and task in WORKED_SOLUTIONS
    )


def _reasoning(example: Example) -> str:
    reasoning = example.metadata.get("reasoning")
    if isinstance(reasoning, str) and reasoning.strip():
        return reasoning.strip()
    return WORKED_SOLUTIONS.get(example.metadata["task"])(example)
