"""The accepted-wordings judge: a final answer is correct iff, lightly normalised, it equals one of the example's
accepted wordings (``metadata["accepted"]``, e.g. every way ``task:freeform`` accepts to say "Thursday"), or the
reference itself. It knows every correct wording, so it can judge free-form answers that a rule verifier comparing
with one reference misjudges, and it is meant as the held-out judge that no training arm uses as its reward."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

from incentive.data.example import Example
from incentive.rewards.base import REWARDS
from incentive.rewards.verifier import MAX_ANSWER_CHARS, AnswerReward, Verdict

ARTICLES = frozenset({"a", "an", "the"})
PREAMBLES = ("final answer is ", "final answer ", "answer is ", "answer ")
"""Lead-ins dropped from a normalised answer ("The answer is: Thursday" → "thursday")."""
_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc`]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_SIGN = re.compile(r"(?<![\w.])-(?=\d)")
_OTHER = re.compile(r"[^\w\s:.<>\u2212]|_")
_LOOSE_POINT = re.compile(r"(?<!\d)[:.]|[:.](?!\d)")
_O_CLOCK = re.compile(r"\bo clock\b")


def normalize_wording(text: str) -> str:
    """Lower case, apostrophes dropped (``o'clock`` → ``oclock``, ``it's`` → ``its``), punctuation and hyphens
    as spaces (``forty-seven`` → ``forty seven``) except a minus sign, a colon or point between digits (``8:00``)
    and ``<``/``>``; articles and an "answer is" lead-in dropped; spacing collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _APOSTROPHES.sub("", _THOUSANDS.sub("", text))
    text = _SIGN.sub("\u2212", text)
    text = _LOOSE_POINT.sub(" ", _OTHER.sub(" ", text))
    text = re.sub(r"([<>])", r" \1 ", text).replace("\u2212", "-")
    words = [word for word in text.split() if word not in ARTICLES]
    text = _O_CLOCK.sub("oclock", " ".join(words))
    for preamble in PREAMBLES:
        if text.startswith(preamble):
            return text[len(preamble) :]
    return text


def matches(answer: str, accepted: Iterable[str]) -> bool:
    """Whether ``answer`` is one of ``accepted`` after :func:`normalize_wording`; an empty answer never is."""
    norm = normalize_wording(answer)
    return bool(norm) and any(norm == normalize_wording(wording) for wording in accepted)


def accepted_wordings(example: Example, key: str = "accepted") -> list[str]:
    """The example's reference and the wordings in ``metadata[key]`` (a list of strings, or one string)."""
    extra = example.metadata.get(key, [])
    if isinstance(extra, str):
        extra = [extra]
    if not isinstance(extra, Sequence) or not all(isinstance(w, str) for w in extra):
        raise ValueError(f"metadata '{key}' must be a list of strings, got {type(extra).__name__}")
    return [example.reference, *extra]


@REWARDS.register("accepted_wordings")
class AcceptedWordings(AnswerReward):
    """1 when the final answer (the answer block, its ``\\boxed{}`` if it holds one, else the last ``\\boxed{}``)
    is an accepted wording of the example's answer, else 0 with a reason when there was nothing to compare.
    Extras: ``correct``."""

    def __init__(self, key: str = "accepted") -> None:
        self.key = key

    def verify(self, example: Example, answer: str | None) -> Verdict:
        """Judge one extracted answer; bad ``accepted`` metadata is a 0 with a reason, never a crash."""
        if answer is None:
            return Verdict(0.0, None, "no answer found")
        if not answer.strip():
            return Verdict(0.0, answer, "empty answer")
        if len(answer) > MAX_ANSWER_CHARS:
            return Verdict(0.0, answer, f"answer too long ({len(answer)} characters)")
        try:
            wordings = accepted_wordings(example, self.key)
        except ValueError as err:
            return Verdict(0.0, answer, f"checker error: {err}")
        return Verdict(float(matches(answer, wordings)), answer)

