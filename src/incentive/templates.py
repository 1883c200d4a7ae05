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


class NoverTemplate(Template):
    """The NOVER paper's plain-text prompt: question, marker sentence, and a tag skeleton."""

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
