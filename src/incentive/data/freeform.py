"""``task:freeform``: short questions whose answers are free-form phrases with many correct wordings ("Thursday",
"It will be Thursday", "thu"; "8 o'clock", "eight", "8:00"), where a rule verifier comparing with one reference
wording misjudges correct paraphrases, so verifier-free training (NOVER) can be compared with verifier rewards.

Four kinds: ``weekday`` (day-of-week arithmetic), ``clock`` (12-hour clock arithmetic), ``compare`` (which of two
numbers is larger or smaller) and ``count`` (how many items a list has). Each example's reference is one wording,
drawn per example when ``vary_reference`` is on (so the references a policy imitates vary in wording); its
metadata carries every accepted wording (``accepted``; the judge drops articles, so "a Thursday" needs no entry of
its own), which the ``accepted_wordings`` judge compares with.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from incentive.data.example import Example
from incentive.data.solutions import WORKED_SOLUTIONS
from incentive.data.tasks import TASKS, TaskItem

KINDS = ("weekday", "clock", "compare", "count")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
THINGS = (
    "apple", "pear", "plum", "grape", "lemon", "melon", "peach", "cherry", "mango", "lime",
    "cat", "dog", "cow", "hen", "duck", "fox", "owl", "bee", "ant", "frog",
    "cup", "pen", "hat", "box", "key", "book", "lamp", "chair", "bell", "drum",
)  # fmt: skip
"""What the count kind's lists are made of: short, common, one token or two."""
_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_MAX_DRAWS = 10_000
"""Draws per item before a split (or, with ``distinct``, its unused part) is reported as having no question."""


def number_words(n: int) -> list[str]:
    """English names of ``0 <= n <= 999``: ``"forty-seven"``, ``"one hundred and five"`` / ``"one hundred five"``."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words covers 0 to 999, got {n}")
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        tens, ones = divmod(n, 10)
        return [_TENS[tens - 2] + (f"-{_ONES[ones]}" if ones else "")]
    hundreds, rest = divmod(n, 100)
    head = f"{_ONES[hundreds]} hundred"
    if not rest:
        return [head]
    rests = number_words(rest)
    return [f"{head} and {words}" for words in rests] + [f"{head} {words}" for words in rests]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _phrases(prefixes: Sequence[str], forms: Sequence[str]) -> list[str]:
    """Every prefix before every form, in order, without repeats."""
    return list(dict.fromkeys(f"{prefix}{form}" for prefix in prefixes for form in forms))


@dataclass(frozen=True)
class FreeformItem:
    """One problem of a kind: its question, the answer's short form, every accepted wording, the wordings a
    reference may take (the first is the canonical one) and a worked solution."""

    kind: str
    params: dict[str, Any]
    question: str
    canonical: str
    accepted: list[str]
    references: list[str]
    reasoning: str


def _weekday(params: dict[str, Any]) -> FreeformItem:
    """The day ``days`` days after (or, with ``back``, before) weekday ``start`` (0 is Monday)."""
    start, days, back = int(params["start"]), int(params["days"]), bool(params["back"])
    step = -1 if back else 1
    today, day = WEEKDAYS[start], WEEKDAYS[(start + step * days) % 7]
    if back:
        question = f"Today is {today}. What day of the week was it {_plural(days, 'day')} ago?"
        prefixes = ["", "it was ", "that was ", "the day was ", "it is ", "it's "]
        references = [day, f"It was {day}.", f"That was a {day}."]
    else:
        question = f"Today is {today}. What day of the week will it be in {_plural(days, 'day')}?"
        prefixes = ["", "it will be ", "it is ", "it's ", "it'll be ", "that will be ", "that is ",
                    "the day will be ", "it would be "]  # fmt: skip
        references = [day, f"It will be {day}.", f"It is {day}."]
    weeks, rest = divmod(days, 7)
    lines = []
    if weeks:
        weeks_text = _plural(weeks, "week")
        lines.append(
            f"{days} days is {weeks_text}, so it is {today} again."
            if not rest
            else f"{days} days is {weeks_text} and {_plural(rest, 'day')}; after {weeks_text} it is {today} again."
        )
    if rest:
        names = ", ".join(WEEKDAYS[(start + step * k) % 7] for k in range(1, rest + 1))
        lines.append(f"Counting {_plural(rest, 'day')} {'back' if back else 'on'} from {today}: {names}.")
    accepted = _phrases(prefixes, [day, day[:3]])
    return FreeformItem("weekday", dict(params), question, day, accepted, references, "\n".join(lines))


def _clock(params: dict[str, Any]) -> FreeformItem:
    """What a 12-hour clock showing ``start`` o'clock shows ``hours`` hours later."""
    start, hours = int(params["start"]), int(params["hours"])
    total = start + hours
    lines = [f"{start} + {hours} = {total}"]
    while total > 12:
        lines.append(f"{total} - 12 = {total - 12} (a clock starts again after 12)")
        total -= 12
    word = number_words(total)[0]
    forms = [str(total), word, f"{total} o'clock", f"{word} o'clock", f"{total}:00"]
    prefixes = ["", "it will be ", "it will show ", "it shows ", "it is ", "it's ", "it'll be ",
                "the clock will show ", "the clock shows ", "the time will be ", "the time is "]  # fmt: skip
    question = f"A clock shows {start} o'clock. What time will it show {_plural(hours, 'hour')} later?"
    references = [forms[2], f"{word.capitalize()} o'clock", forms[4], f"It will show {total} o'clock."]
    accepted = _phrases(prefixes, forms)
    return FreeformItem("clock", dict(params), question, forms[2], accepted, references, "\n".join(lines))


_ADJECTIVES = {"larger": ("larger", "bigger", "greater"), "smaller": ("smaller", "lower", "less")}


def _compare(params: dict[str, Any]) -> FreeformItem:
    """Which of ``a`` and ``b`` is larger or smaller (``ask``)."""
    a, b, ask = int(params["a"]), int(params["b"]), str(params["ask"])
    if a == b or ask not in _ADJECTIVES:
        raise ValueError(f"compare needs two different numbers and ask 'larger' or 'smaller', got {params}")
    winner, other = (max(a, b), min(a, b)) if ask == "larger" else (min(a, b), max(a, b))
    mine, theirs = [str(winner), *number_words(winner)], [str(other), *number_words(other)]
    accepted = list(mine)
    for adjective in _ADJECTIVES[ask]:
        for x in mine:
            accepted += [
                f"{x} is {adjective}",
                f"{x} is the {adjective}",
                f"{x} is the {adjective} number",
                f"{x} is the {adjective} one",
                f"the {adjective} is {x}",
                f"the {adjective} number is {x}",
                f"the {adjective} one is {x}",
            ]
            accepted += [f"{x} is {adjective} than {y}" for y in theirs]
    accepted += [f"{max(a, b)} > {min(a, b)}", f"{min(a, b)} < {max(a, b)}"]
    sign = ">" if a > b else "<"
    references = [mine[0], f"{winner} is {ask}.", f"The {ask} number is {winner}.", mine[1]]
    return FreeformItem(
        "compare",
        dict(params),
        f"Which number is {ask}, {a} or {b}?",
        str(winner),
        list(dict.fromkeys(accepted)),
        references,
        f"{a} {sign} {b}, so the {ask} number is {winner}.",
    )


def _count(params: dict[str, Any]) -> FreeformItem:
    """How many things the list ``items`` has."""
    items = [str(item) for item in params["items"]]
    n = len(items)
    if n < 2:
        raise ValueError(f"count needs at least 2 items, got {items}")
    word = number_words(n)[0]
    suffixes = ["", " items", " in total", " items in total"]
    counts = [f"{number}{suffix}" for number in (str(n), word) for suffix in suffixes]
    accepted = counts + [f"the list has {number} items" for number in (str(n), word)]
    accepted += [f"there are {count}" for count in counts]
    numbered = ", ".join(f"{i} {item}" for i, item in enumerate(items, start=1))
    return FreeformItem(
        "count",
        dict(params),
        f"How many items are in this list: {', '.join(items)}?",
        str(n),
        accepted,
        [str(n), word.capitalize(), f"{n} items", f"There are {word} items."],
        f"Counting them: {numbered}.",
    )


BUILDERS: dict[str, Callable[[dict[str, Any]], FreeformItem]] = {
    "weekday": _weekday,
    "clock": _clock,
    "compare": _compare,
    "count": _count,
}


def freeform_item(kind: str, params: dict[str, Any]) -> FreeformItem:
    """The problem of ``kind`` with these parameters (as stored in an example's ``metadata["params"]``)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown freeform kind '{kind}'; the kinds are: {', '.join(KINDS)}")
    return BUILDERS[kind](params)


@dataclass(frozen=True)
class Knobs:
    """The difficulty knobs: offsets up to ``max_days`` days (``days_back``: also "… days ago") and
    ``max_hours`` hours, numbers 1 to ``max_value``, lists of ``min_items`` to ``max_items`` things."""

    max_days: int
    days_back: bool
    max_hours: int
    max_value: int
    min_items: int
    max_items: int

    def check(self) -> None:
        if not 1 <= self.max_days <= 999:
            raise ValueError(f"max_days must be 1 to 999, got {self.max_days}")
        if not 1 <= self.max_hours <= 999:
            raise ValueError(f"max_hours must be 1 to 999, got {self.max_hours}")
        if not 2 <= self.max_value <= 999:
            raise ValueError(f"max_value must be 2 to 999, got {self.max_value}")
        if not 2 <= self.min_items <= self.max_items <= len(THINGS):
            raise ValueError(
                f"need 2 <= min_items <= max_items <= {len(THINGS)}, got {self.min_items} and {self.max_items}"
            )

    def draw(self, kind: str, rng: random.Random) -> dict[str, Any]:
        """Random parameters of one problem of ``kind``."""
        if kind == "weekday":
            back = self.days_back and rng.random() < 0.5
            return {"start": rng.randrange(7), "days": rng.randint(1, self.max_days), "back": back}
        if kind == "clock":
            return {"start": rng.randint(1, 12), "hours": rng.randint(1, self.max_hours)}
        if kind == "compare":
            a, b = rng.sample(range(1, self.max_value + 1), 2)
            return {"a": a, "b": b, "ask": rng.choice(("larger", "smaller"))}
        return {"items": rng.sample(THINGS, rng.randint(self.min_items, self.max_items))}


def in_test_split(question: str, test_share: float) -> bool:
    """Whether a question belongs to the held-out split: a fixed hash of its text, so train and test never share
    a question whatever the seeds and sizes."""
    return zlib.crc32(question.encode()) % 10_000 < test_share * 10_000


@TASKS.register("freeform")
def freeform_task(
    size: int,
    seed: int,
    *,
    kinds: Sequence[str] = KINDS,
    max_days: int = 6,
    days_back: bool = False,
    max_hours: int = 12,
    max_value: int = 99,
    min_items: int = 2,
    max_items: int = 6,
    vary_reference: bool = True,
    split: Literal["all", "train", "test"] = "all",
    test_share: float = 0.2,
    distinct: bool = False,
) -> list[TaskItem]:
    """``size`` problems, the kinds taken in turn; with ``split`` train or test only questions of that side of
    the fixed held-out split (``test_share`` of all questions), with ``distinct`` no question twice. The
    reference is a wording drawn per example when ``vary_reference``, else the canonical one."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [kind for kind in kinds if kind not in BUILDERS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be some of {', '.join(KINDS)}; got {kinds}")
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be all, train or test, got {split!r}")
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be between 0 and 1, got {test_share}")
    knobs = Knobs(max_days, days_back, max_hours, max_value, min_items, max_items)
    knobs.check()
    rng = random.Random(seed)
    out = []
    seen: set[str] = set()
    for index in range(size):
        kind = kinds[index % len(kinds)]
        for _ in range(_MAX_DRAWS):
            item = freeform_item(kind, knobs.draw(kind, rng))
            wanted = split == "all" or in_test_split(item.question, test_share) == (split == "test")
            if wanted and not (distinct and item.question in seen):
                break
        else:
            more = "no new" if distinct else "no"
            raise ValueError(f"{more} {kind} question falls in the {split} split with these settings")
        seen.add(item.question)
        reference = rng.choice(item.references) if vary_reference else item.references[0]
        metadata = {
            "kind": kind,
            "params": item.params,
            "canonical": item.canonical,
            "accepted": item.accepted,
        }
        out.append(TaskItem(item.question, reference, kind, metadata))
    return out


@WORKED_SOLUTIONS.register("freeform")
def freeform_solution(example: Example) -> str:
    """The item's worked steps, rebuilt from its parameters; refuses a reference that is no accepted wording."""
    from incentive.rewards.wordings import matches

    meta = example.metadata
    item = freeform_item(str(meta.get("kind")), dict(meta.get("params") or {}))
    if not matches(example.reference, item.accepted):
        raise ValueError(
            f"example '{example.id}': reference {example.reference!r} is not an accepted wording of "
            f"{item.canonical!r}"
        )
    return item.reasoning
