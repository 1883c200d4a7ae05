"""The typed GETER recipe (``incentive geter RECIPE``): unknown keys and bad values fail as one line naming them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from incentive.config import (
    LoraConfig,
    OptimConfig,
    RecipeTree,
    Strict,
)
from incentive.geter.events import NOISE, RULES


class GeterModelConfig(Strict):
    name: str = Field("embedded", description="the LM: embedded (SmolLM2-135M-Instruct), tiny-random, a folder")
    lora: LoraConfig | None = Field(None, description="LoRA adapters (null: full fine-tuning)")


class GraphConfig(Strict):
    """The synthetic temporal knowledge graph and the queries asked about it."""

    seed: int = 0
    entities: int = Field(50, ge=4, le=4900)
    rules: int = Field(4, ge=1, le=len(RULES), description="premise → consequence rules (two relations each)")
    noise_relations: int = Field(2, ge=0, le=len(NOISE), description="relations no rule involves")
    timestamps: int = Field(100, ge=12)
    events_per_step: int = Field(6, ge=1, description="spontaneous events per day (rules add their consequences)")
    rule_probability: float = Field(0.8, gt=0, le=1, description="chance that a premise brings its consequence")
    window: int = Field(4, ge=1, description="days of history before a query that are retrieved")
    max_history: int = Field(6, ge=1, description="history facts retrieved per query (evidence first)")
    train_share: float = Field(
        0.7, gt=0, lt=1, description="days before this share: encoder training and SFT queries; after: eval"
    )
    train_queries: int = Field(300, ge=3)
    eval_queries: int = Field(60, ge=3)
    history_in_prompt: bool = Field(
        True, description="list the retrieved facts in the prompt (the paper's reasoning chains); false: graph only"
    )

    @property
    def split(self) -> int:
        """The first eval day: days before it train the encoder and give the SFT queries."""
        return int(self.timestamps * self.train_share)

    @model_validator(mode="after")
    def _window_covers_lags(self) -> GraphConfig:
        lag = max(rule.lag for rule in RULES[: self.rules])
        if self.window < lag:
            raise ValueError(f"window ({self.window}) is shorter than the longest rule lag ({lag} days)")
        return self


class EncoderConfig(Strict):
    """Where the graph embedding comes from."""

    kind: Literal["regcn", "random", "none"] = Field(
        "regcn",
        description="regcn: R-GCN + GRU trained by link prediction; random: a frozen random embedding table "
        "(ablation); none: no graph token",
    )
    dim: int = Field(32, ge=2, description="d; the pooled graph embedding has 3d values")
    layers: int = Field(2, ge=1, le=4, description="R-GCN layers per snapshot")
    history: int = Field(5, ge=1, description="snapshots the GRU evolves the entity embeddings over")
    steps: int = Field(200, ge=0, description="link-prediction steps")
    lr: float = Field(1e-2, gt=0)
    timestamps_per_step: int = Field(4, ge=1)


class PrefixConfig(Strict):
    tokens: int = Field(1, ge=1, description="soft tokens the projector makes (GETER: 1)")
    position: Literal["start", "before_query"] = Field(
        "start", description="start: before the whole prompt (GETER); before_query: before the user message"
    )


class GeterSFTConfig(Strict):
    steps: int = Field(100, ge=0)
    batch_size: int = Field(8, ge=1)
    projector_lr: float | None = Field(None, gt=0, description="default: optim.lr")


class GeterEvalConfig(Strict):
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)


class GeterRunConfig(Strict):
    output_dir: str = "runs"
    name: str | None = None
    seed: int = 0
    threads: int | None = Field(None, ge=1)


class GeterConfig(Strict):
    """A whole GETER run: graph → encoder → SFT of the LM and projector → eval."""

    description: str = ""
    model: GeterModelConfig = GeterModelConfig()
    graph: GraphConfig = GraphConfig()
    encoder: EncoderConfig = EncoderConfig()
    prefix: PrefixConfig = PrefixConfig()
    sft: GeterSFTConfig = GeterSFTConfig()
    optim: OptimConfig = OptimConfig(lr=3e-4, weight_decay=1e-5, schedule="cosine", warmup_steps=1)
    eval: GeterEvalConfig = GeterEvalConfig()
    run: GeterRunConfig = GeterRunConfig()


def load_config(path: str | Path, overrides: list[str] | None = None) -> GeterConfig:
    """Read a GETER recipe, apply ``--set`` overrides, validate; a problem is a one-line ConfigError."""
    recipe = RecipeTree(path)
    recipe.override(overrides or [])
    return recipe.validate(GeterConfig)
