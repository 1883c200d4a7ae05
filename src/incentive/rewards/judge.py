"""LLM judges shared by the TinyV and General-Reasoner rewards: a local causal LM answering verification prompts in
greedy batches (loaded on first use, so recipe validation stays fast), retries on errors, and a verdict cache keyed
by (question, reference, answer) so a repeated answer costs one generation per run."""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.models.loading import ModelLoadError, load_model, load_tokenizer

Triple = tuple[str, str, str]
"""(question, reference answer, extracted model answer)."""


class Judge(Protocol):
    """Turns prompts into completions; ``chat`` wraps each prompt as one user turn of the judge's chat template."""

    def complete(
        self, prompts: Sequence[str], *, chat: bool, max_new_tokens: int, temperature: float
    ) -> list[str]: ...


@cache
def _load(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """One copy of each judge model per process, shared by every reward and evaluation that names it."""
    model = load_model(name).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(name)


class LocalJudge:
    """Any causal LM that :func:`incentive.models.load_model` understands, on the CPU (or where it loads)."""

    def __init__(self, model: str = "embedded", batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model
        self.batch_size = batch_size

    @torch.no_grad()
    def complete(
        self, prompts: Sequence[str], *, chat: bool, max_new_tokens: int, temperature: float
    ) -> list[str]:
        model, tok = _load(self.model_name)
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [self._render(p, tok, chat) for p in prompts[start : start + self.batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
            sample = temperature > 0
            generated = model.generate(
                input_ids=enc.input_ids.to(model.device),
                attention_mask=enc.attention_mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
            new = generated[:, enc.input_ids.shape[1] :]
            out += tok.batch_decode(new, skip_special_tokens=True)
        return out

    @staticmethod
    def _render(prompt: str, tok: PreTrainedTokenizerBase, chat: bool) -> str:
        if not chat or not tok.chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


@dataclass(frozen=True)
class Decision:
    """A judge's verdict on one triple (None: failed or unreadable), its raw output, and whether it was cached."""

    verdict: bool | None
    output: str = ""
    error: str | None = None
    cached: bool = False


@dataclass(frozen=True)
class JudgeSettings:
    """How a judge is asked: greedy by default; on an error a batch is retried ``retries`` times at
    ``temperature + retry_temperature`` (TinyV's rule: the same raised temperature each time, not cumulative)."""

    chat: bool
    max_new_tokens: int
    temperature: float = 0.0
    retries: int = 3
    retry_temperature: float = 0.3
    batch_size: int = 16


class CachedJudge:
    """Asks a judge about triples: each distinct triple once (per batch and, through an LRU cache, per run), in
    batches, with retries; counts what happened; optionally appends every fresh decision to a JSONL log."""

    def __init__(
        self,
        judge: Judge,
        prompt: Callable[[str, str, str], str],
        parse: Callable[[str], bool | None],
        settings: JudgeSettings,
        cache_size: int = 100_000,
        log_file: str | None = None,
    ) -> None:
        self.judge = judge
        self.prompt = prompt
        self.parse = parse
        self.settings = settings
        self.cache_size = cache_size
        self.log_file = Path(log_file) if log_file else None
        self._cache: OrderedDict[Triple, Decision] = OrderedDict()
        self.counts: Counter[str] = Counter()

    def decide(self, triples: Sequence[Triple]) -> list[Decision]:
        """One decision per triple, in order; repeats and cached triples cost no generation."""
        known = {t: self._cache[t] for t in set(triples) if t in self._cache}
        fresh = [t for t in dict.fromkeys(triples) if t not in known]
        for triple, (output, error) in zip(fresh, self._ask([self.prompt(*t) for t in fresh]), strict=True):
            decision = Decision(None if error else self.parse(output), output, error)
            self.counts["generated"] += 1
            self.counts["failed"] += error is not None
            self.counts["unreadable"] += error is None and decision.verdict is None
            if error is None:  # a failure is retried next time; a reading, even an unreadable one, is kept
                self._remember(triple, decision)
            self._log(triple, decision)
            known[triple] = decision
        first_use = set(fresh)
        decisions = []
        for triple in triples:
            if triple in first_use:
                first_use.discard(triple)
                decisions.append(known[triple])
                continue
            self.counts["cache_hits"] += 1
            if triple in self._cache:
                self._cache.move_to_end(triple)
            decisions.append(replace(known[triple], cached=True))
        return decisions

    def _ask(self, prompts: list[str]) -> list[tuple[str, str | None]]:
        s = self.settings
        out: list[tuple[str, str | None]] = []
        for start in range(0, len(prompts), s.batch_size):
            chunk = prompts[start : start + s.batch_size]
            error = ""
            for attempt in range(s.retries + 1):
                temperature = s.temperature + (s.retry_temperature if attempt else 0.0)
                try:
                    texts = self.judge.complete(
                        chunk, chat=s.chat, max_new_tokens=s.max_new_tokens, temperature=temperature
                    )
                    if len(texts) != len(chunk):
                        raise RuntimeError(f"judge returned {len(texts)} outputs for {len(chunk)} prompts")
                    out += [(t, None) for t in texts]
                    break
                except ModelLoadError:  # a judge that cannot load is a setup error: stop, don't score zeros
                    raise
                except Exception as err:  # a judge error is a scored outcome, retried, then a reasoned 0
                    error = f"{type(err).__name__}: {err}"
            else:
                out += [("", f"{s.retries + 1} attempts failed, last: {error}")] * len(chunk)
        return out

    def _remember(self, triple: Triple, decision: Decision) -> None:
        self._cache[triple] = decision
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _log(self, triple: Triple, decision: Decision) -> None:
        if self.log_file is None:
            return
        question, reference, answer = triple
        record: dict[str, Any] = {
            "question": question,
            "reference": reference,
            "answer": answer,
            "output": decision.output,
            "verdict": decision.verdict,
            "error": decision.error,
        }
        with self.log_file.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
