"""A run's held-out evals: each evaluated once per key (the stage ends ``base``, ``sft``, ``rl`` and the
``rl-stepN`` evals between steps), kept in evals.json with every completion in evals/KEY.completions.jsonl, and
RL's paired against the stage it started from."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from incentive.config import EvalConfig
from incentive.data import Example
from incentive.engines import Engine, SamplingParams
from incentive.evaluation import compare, evaluate, write_completions
from incentive.rewards.base import Reward
from incentive.templates import Template

STAGE_ENDS = ("base", "sft", "rl")
"""The evals at stage ends (``eval.stages`` picks among them); ``rl-stepN`` evals come from ``eval.every``."""


class HeldOutEvals:
    """Evaluates the policy on the held-out examples with the eval settings, once per key (a resumed run keeps
    the ones done); ``engine`` builds the rollout engine to use (None: the evaluator's own)."""

    def __init__(
        self,
        run_dir: Path,
        cfg: EvalConfig,
        examples: list[Example],
        template: Template,
        verifier: Reward,
        max_new_tokens: int,
        sampling_seed: int,
        engine: Callable[[PreTrainedModel, Any, int], Engine] | None,
    ) -> None:
        self.dir, self.cfg, self.examples, self.template = run_dir, cfg, examples, template
        self.verifier, self.sampling_seed, self.engine = verifier, sampling_seed, engine
        self.params = SamplingParams(cfg.samples, cfg.max_new_tokens or max_new_tokens, cfg.temperature)

    def done(self) -> dict[str, Any]:
        path = self.dir / "evals.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def run(self, key: str, policy: PreTrainedModel, tokenizer: Any) -> dict[str, Any] | None:
        """The eval ``key`` (made now unless done already); None without held-out data or for a stage end
        ``eval.stages`` leaves out."""
        if not self.examples or key in STAGE_ENDS and key not in self.cfg.stages:
            return None
        done = self.done()
        if key in done:
            return done[key]
        start = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(self.sampling_seed)
            engine = self.engine(policy, tokenizer, self.cfg.batch_size) if self.engine else None
            result = evaluate(
                policy,
                tokenizer,
                self.template,
                self.examples,
                self.params,
                self.cfg.batch_size,
                self.verifier,
                engine=engine,
            )
        result.update(
            seconds=time.perf_counter() - start, sampling_seed=self.sampling_seed, verifier=self.cfg.verifier
        )
        self._save(key, result)
        shown = (("accuracy", "accuracy"), ("accuracy_lenient", "any format"), ("format_rate", "format"))
        rates = "  ".join(
            f"{label} {result[k]:.1%} [{result[f'{k}_ci'][0]:.1%}, {result[f'{k}_ci'][1]:.1%}]"
            for k, label in shown
        )
        print(
            f"[eval {key}] {rates} (95% CI)  mean length {result['length_mean']:.1f} tokens  "
            f"({result['n']} completions, {result['seconds']:.0f} s)"
        )
        return result

    def _save(self, key: str, result: dict[str, Any]) -> None:
        """Every completion to evals/KEY.completions.jsonl (what `incentive compare` reads), the rest to
        evals.json."""
        lines = Path("evals") / f"{key}.completions.jsonl"
        write_completions(result.pop("per_prompt"), self.dir / lines)
        result["completions_file"] = str(lines)
        evals = self.done()
        evals[key] = result
        tmp = self.dir / "evals.json.tmp"
        tmp.write_text(json.dumps(evals, indent=2))
        tmp.replace(self.dir / "evals.json")

    def compare_stages(self) -> dict[str, Any] | None:
        """RL's eval against the stage it started from (SFT, else the base model), paired over the same prompts;
        written to comparison.json. None without both."""
        evals = self.done()
        before = "sft" if "sft" in evals else "base" if "base" in evals else None
        if "rl" not in evals or before is None:
            return None
        result = compare(self.dir / evals[before]["completions_file"], self.dir / evals["rl"]["completions_file"])
        result.update(a_stage=before, b_stage="rl")
        (self.dir / "comparison.json").write_text(json.dumps(result, indent=2))
        return result
