"""Hints from a language model: the scene described in text, the answer read from a fixed JSON format. An
answer that is not JSON, or whose fields are wrong, gives no hint (the cache keeps its last one) and is counted."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from incentive.control.config import COMPONENTS, HintConfig
from incentive.control.hints import CATEGORIES, HINT_SOURCES, Hint, HintSource, road_index, simplex
from incentive.control.scene import SECTORS, Scene, describe

Complete = Callable[[Sequence[str]], list[str]]
"""Prompts → completions, one each."""

EXAMPLE = (
    '{"risk": "low", "density": "medium", "road": "straight", "manoeuvre": "keep", '
    '"agents": ["front", "rear-left"], "weights": {"safety": 0.3, "efficiency": 0.5, "comfort": 0.2}}'
)
"""The answer format shown to the model (its values are only an example)."""

FORMAT = (
    "Answer with one JSON object like this example, and nothing else:\n" + EXAMPLE + "\n"
    "road: " + ", ".join(CATEGORIES["road"]) + ". density and risk: low, medium or high. manoeuvre: "
    + ", ".join(CATEGORIES["manoeuvre"]) + ". agents: the direction of each vehicle listed, in order: "
    + ", ".join(SECTORS) + ". weights: how much safety, efficiency and comfort matter now."
)


def prompt(scene: Scene, agents: int, context: str = "") -> str:
    """The question put to the model: its role, the scene, any retrieved knowledge, and the answer format."""
    parts = ["You advise the controller of a self-driving car. Read the scene and rate it.", describe(scene, agents)]
    if context:
        parts.append(context)
    parts.append(FORMAT)
    return "\n\n".join(parts)


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (models wrap it in prose or code fences); failing that, the longest
    prefix of a cut-off object that closes into one (small models repeat keys until the token limit), or None."""
    decoder = json.JSONDecoder()
    for start in (i for i, char in enumerate(text) if char == "{"):
        try:
            value = decoder.raw_decode(text, start)[0]
        except json.JSONDecodeError:
            value = _closed_prefix(text[start:])
        if isinstance(value, dict):
            return value
    return None


def _closed_prefix(text: str) -> dict[str, Any] | None:
    """The longest prefix of ``text`` ending before a top-level comma that parses once a brace closes it."""
    depth, in_string, escaped, cuts = 0, False, False, []
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif in_string:
            escaped = char == "\\"
            in_string = char != '"'
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == "," and depth == 1:
            cuts.append(i)
    for cut in reversed(cuts):
        try:
            value = json.loads(text[:cut] + "}")
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _category(value: Any, names: tuple[str, ...]) -> int | None:
    if not isinstance(value, str):
        return None
    key = value.strip().lower().replace(" ", "_").replace("-", "_")
    normalised = [name.replace("-", "_") for name in names]
    return normalised.index(key) if key in normalised else None


def _weights(value: Any) -> tuple[float, float, float] | None:
    if isinstance(value, dict):
        value = [value.get(name) for name in COMPONENTS]
    if not isinstance(value, list) or len(value) != len(COMPONENTS):
        return None
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        return None
    if min(value) < 0 or sum(value) <= 0:
        return None
    return simplex(value)


def parse_hint(text: str, scene: Scene, agents: int) -> tuple[Hint | None, str | None]:
    """(hint, None) from a model's answer, or (None, why): ``bad_json`` when no JSON object is found,
    ``bad_fields`` when one is but a category, direction or weight is missing or unknown. The road defaults to
    the scene's; agent slots the answer leaves out are −1."""
    data = first_json_object(text)
    if data is None:
        return None, "bad_json"
    scenario: list[int] = []
    for key, names in CATEGORIES.items():
        index = road_index(scene) if key == "road" and "road" not in data else _category(data.get(key), names)
        if index is None:
            return None, "bad_fields"
        scenario.append(index)
    listed = data.get("agents", [])
    if not isinstance(listed, list):
        return None, "bad_fields"
    directions = [_category(d, SECTORS) for d in listed[:agents]]
    if any(d is None for d in directions):
        return None, "bad_fields"
    weights = _weights(data.get("weights"))
    if weights is None:
        return None, "bad_fields"
    padded = tuple(int(d) for d in directions if d is not None) + (-1,) * (agents - len(directions))
    return Hint((scenario[0], scenario[1], scenario[2], scenario[3]), padded, weights), None


@HINT_SOURCES.register("lm")
class LanguageModelHints(HintSource):
    """Hints from ``hints.model`` (greedy, one scene per call), loaded on first use; ``complete`` stands in for
    the model (tests)."""

    def __init__(self, config: HintConfig, seed: int, complete: Complete | None = None) -> None:
        super().__init__(config, seed)
        self._complete = complete

    def complete(self, prompts: Sequence[str]) -> list[str]:
        if self._complete is None:
            from incentive.rewards.judge import LocalJudge

            judge = LocalJudge(self.config.model, batch_size=1)
            tokens = self.config.max_new_tokens
            self._complete = lambda ps: judge.complete(ps, chat=True, max_new_tokens=tokens, temperature=0.0)
        return self._complete(prompts)

    def hint(self, scene: Scene, context: str = "") -> Hint | None:
        (answer,) = self.complete([prompt(scene, self.config.agents, context)])
        self.counts["calls"] += 1
        hint, problem = parse_hint(answer, scene, self.config.agents)
        if problem is not None:
            self.counts[problem] += 1
            self.counts["fallbacks"] += 1
        return hint
