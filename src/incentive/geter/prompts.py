"""GETER's chat format: system = the instruction, user = the query (and, optionally, the retrieved history facts),
assistant = label + explanation; token ids with the graph token's position and the assistant-only loss mask."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from incentive.geter.events import TemporalGraph
from incentive.geter.queries import Query
from incentive.training.sft import TargetEncoder

SYSTEM = (
    "You judge whether an event between fictional countries is plausible on a given day, from what happened "
    "in the days before. Please answer yes, no, or unsure then explain your decision."
)
MARK = "\u0000"
"""Stands where the user message begins while the chat template is rendered; cut out before tokenizing."""


def user_text(graph: TemporalGraph, query: Query, with_history: bool) -> str:
    """The query in words, then the history facts one per line (when ``with_history``)."""
    q = query.quad
    relation = graph.relations[q.r].base
    text = f"Query: is it plausible that {graph.entities[q.s]} will {relation} {graph.entities[q.o]} on day {q.t}?"
    if not with_history:
        return text
    facts = "\n".join(graph.fact(f) for f in query.history) or "(nothing)"
    return f"{text}\nHistory:\n{facts}"


@dataclass(frozen=True)
class Encoded:
    """A query as the LM sees it: prompt ids (chat template, generation prompt included), where the graph token
    goes in them, and the answer's ids (EOS appended)."""

    prompt: list[int]
    at: int
    answer: list[int]

    @property
    def row(self) -> list[int]:
        return self.prompt + self.answer

    @property
    def loss_mask(self) -> list[bool]:
        """Loss on the assistant's answer only: system, user and the assistant header are left out."""
        return [False] * len(self.prompt) + [True] * len(self.answer)


def encode(
    tokenizer: PreTrainedTokenizerBase, graph: TemporalGraph, query: Query, with_history: bool, position: str
) -> Encoded:
    """Token ids of the query's prompt and answer; ``position`` start puts the graph token before the prompt,
    before_query before the user message (the prompt is tokenized in two pieces there)."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": MARK + user_text(graph, query, with_history)},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = rendered.split(MARK, 1)
    answer, _ = TargetEncoder(tokenizer)(query.answer)
    if position != "before_query":
        return Encoded(tokenizer(before + after, add_special_tokens=False).input_ids, 0, answer)
    head = tokenizer(before, add_special_tokens=False).input_ids
    return Encoded(head + tokenizer(after, add_special_tokens=False).input_ids, len(head), answer)
