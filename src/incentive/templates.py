"""Prompt templates and the tagged output format (reasoning tags + answer tags), both configurable."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from transformers import PreTrainedTokenizerBase

from incentive.data.example import Example
from incentive.registry import Registry


@dataclass(frozen=True)
class Parsed:
    """What a completion says: first reasoning block, first answer block, and whether the format is strict."""

    reasoning: str | None
    answer: str | None
    strict: bool


@dataclass(frozen=True)
class TagFormat:
    """``<think>…</think><answer>…</answer>`` with configurable tag names."""

    think: str = "think"
    answer: str = "answer"

    @cached_property
    def _think_re(self) -> re.Pattern[str]:
        return re.compile(rf"<{re.escape(self.think)}>(.*?)</{re.escape(self.think)}>", re.DOTALL)

    @cached_property
    def _answer_re(self) -> re.Pattern[str]:
        return re.compile(rf"<{re.escape(self.answer)}>(.*?)</{re.escape(self.answer)}>", re.DOTALL)

    def parse(self, text: str) -> Parsed:
        """Extract the first blocks; strict means the text is exactly the two blocks, whitespace aside."""
        think = self._think_re.search(text)
        answer = self._answer_re.search(text)
        reasoning = think.group(1).strip() if think else None
        final = answer.group(1).strip() if answer else None
        strict = False
        if reasoning is not None and final is not None:
            expected = f"<{self.think}>{reasoning}</{self.think}><{self.answer}>{final}</{self.answer}>"
            strict = _squash(text) == _squash(expected)
        return Parsed(reasoning, final, strict)

    def render(self, reasoning: str, answer: str) -> str:
        """The canonical completion for a reasoning and an answer (used by SFT data)."""
        return f"<{self.think}>\n{reasoning}\n</{self.think}>\n<{self.answer}>\n{answer}\n</{self.answer}>"

    def instruction(self) -> str:
        return (
            f"Think step by step inside <{self.think}> </{self.think}> tags, then give only the final answer "
            f"inside <{self.answer}> </{self.answer}> tags."
        )


@dataclass(frozen=True)
class SingleBlockFormat(TagFormat):
    """Inverse incentive training: the completion is only the intermediate block (e.g. a story); the answer tag
    names the target block (e.g. a rubric) that is never generated, only scored after the story."""

    def parse(self, text: str) -> Parsed:
        block = self._think_re.search(text)
        content = block.group(1).strip() if block else None
        strict = content is not None and _squash(text) == _squash(f"<{self.think}>{content}</{self.think}>")
        return Parsed(content, None, strict)

    def render(self, reasoning: str, answer: str) -> str:
        return f"<{self.think}>\n{reasoning}\n</{self.think}>"

    def instruction(self) -> str:
        return f"Write your response inside <{self.think}> </{self.think}> tags and nothing else."


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


class Template:
    """Turns an Example into the exact prompt text the policy sees."""

    tag_format: ClassVar[type[TagFormat]] = TagFormat
    think_tag: ClassVar[str] = "think"
    """The intermediate block's tag when the recipe does not name one."""

    def __init__(self, tags: TagFormat, system: str | None = None, use_chat_template: bool = True) -> None:
        self.tags = tags
        self.system = system
        self.use_chat_template = use_chat_template

    def user_message(self, example: Example) -> str:
        return f"{example.prompt}\n\n{self.tags.instruction()}"

    def render(self, example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
        user = self.user_message(example)
        if self.use_chat_template and tokenizer.chat_template:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages.append({"role": "user", "content": user})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix = f"{self.system}\n\n" if self.system else ""
        return f"{prefix}{user}\n"


TEMPLATES: Registry[type[Template]] = Registry("template")
TEMPLATES.register("think-answer")(Template)


@dataclass(frozen=True)
class NoverFormat(TagFormat):
    """NOVER's released layout: a blank line between the blocks (``</think>\\n\\n<answer>``), as in its prompt's
    skeleton and in the text its proxy scores, so SFT targets match what the proxy reads."""

    def render(self, reasoning: str, answer: str) -> str:
        t, a = self.think, self.answer
        return f"<{t}>\n{reasoning}\n</{t}>\n\n<{a}>\n{answer}\n</{a}>"


class NoverTemplate(Template):
    """The NOVER paper's plain-text prompt: question, marker sentence, and a tag skeleton."""

    tag_format = NoverFormat

    def user_message(self, example: Example) -> str:
        t, a = self.tags.think, self.tags.answer
        return (
            f"Question: {example.prompt}\n\nAnswer the question and return in the following format:\n\n"
            f"<{t}>\n...\n</{t}>\n\n<{a}>\n...\n</{a}>\n"
        )


TEMPLATES.register("nover")(NoverTemplate)


class InverseTemplate(Template):
    """NOVER's inverse incentive training: generate the wanted output in the intermediate block; the reference
    (a rubric or set of principles) is the target the proxy must find predictable after it."""

    tag_format = SingleBlockFormat


TEMPLATES.register("inverse")(InverseTemplate)


@dataclass(frozen=True)
class DirectFormat(TagFormat):
    """Fast thinking (GUI-G1): no reasoning block; the whole completion is the answer. Strict when it is not
    empty and opens no reasoning block."""

    def parse(self, text: str) -> Parsed:
        answer = text.strip()
        return Parsed(None, answer or None, bool(answer) and f"<{self.think}>" not in answer)

    def render(self, reasoning: str, answer: str) -> str:
        return answer

    def instruction(self) -> str:
        return "Answer directly with the final answer only: no reasoning, no explanation."


class FastThinkingTemplate(Template):
    """GUI-G1's fast-thinking template: the task and a request to answer at once, no reasoning scaffold."""

    tag_format = DirectFormat


TEMPLATES.register("fast-thinking")(FastThinkingTemplate)


@dataclass(frozen=True)
class PriorFormat(TagFormat):
    """Prior prompt engineering's output: one intermediate block, then the answer block with the result in
    ``\\boxed{}`` (the shape the ``tag_format`` and ``answer_verifier`` rewards check)."""

    def render(self, reasoning: str, answer: str) -> str:
        t, a = self.think, self.answer
        return f"<{t}>\n{reasoning}\n</{t}>\n<{a}>\n\\boxed{{{answer}}}\n</{a}>"

    def instruction(self) -> str:
        a = self.answer
        return f"Then give the final answer inside <{a}> </{a}> tags, with the final result in \\boxed{{}}."


class PriorPromptTemplate(Template):
    """A pPE prior prompt (spec: methods/prior-prompt-engineering.md): an instruction asking for one behaviour in
    its own tag, then the answer, placed before every query. ``behaviour`` names the tag as ``{tag}``."""

    tag_format = PriorFormat
    behaviour: ClassVar[str]

    def user_message(self, example: Example) -> str:
        t = self.tags.think
        prior = self.behaviour.format(tag=f"<{t}> </{t}>")
        return f"{prior} {self.tags.instruction()}\n\n{example.prompt}"


@TEMPLATES.register("ppe-reasoning")
class ReasoningPrior(PriorPromptTemplate):
    """Chain-of-thought turned prior: reason step by step first."""

    behaviour = "First reason through the problem step by step inside {tag} tags."


@TEMPLATES.register("ppe-planning")
class PlanningPrior(PriorPromptTemplate):
    """Plan-and-solve turned prior: write a plan first, then carry it out."""

    think_tag = "plan"
    behaviour = "First devise a plan, the high-level steps that solve the problem, inside {tag} tags."


@TEMPLATES.register("ppe-code")
class CodePrior(PriorPromptTemplate):
    """Program-of-thought turned prior: write code that computes the answer (never executed)."""

    think_tag = "code"
    behaviour = "First write Python code that computes the answer inside {tag} tags (the code is not run)."


@TEMPLATES.register("ppe-knowledge")
class KnowledgePrior(PriorPromptTemplate):
    """Generated-knowledge turned prior: recall the facts, definitions and formulas needed first."""

    think_tag = "knowledge"
    behaviour = (
        "First recall the knowledge the problem needs (facts, definitions, formulas) inside {tag} tags."
    )


@TEMPLATES.register("ppe-null-example")
class NullExamplePrior(PriorPromptTemplate):
    """Null-shot turned prior: refer to an "Examples" section that is never given (the paper's best prior)."""

    think_tag = "examples"
    behaviour = (
        'First look at the examples in the "Examples" section and use the examples and information from that '
        "section inside {tag} tags."
    )
