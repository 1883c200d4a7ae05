"""A GETER run: graph and queries → graph embeddings (trained encoder, frozen random table, or none) → SFT of the
LM and the projector → eval of labels and explanations; progress on the terminal, records in metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from incentive.config import ConfigError, ModelConfig
from incentive.geter.config import GeterConfig
from incentive.geter.encoder import GraphEmbedder, TemporalEncoder, mean_reciprocal_rank, train_encoder
from incentive.geter.events import TemporalGraph, generate_graph
from incentive.geter.metrics import score, summarize
from incentive.geter.prompts import encode, user_text
from incentive.geter.queries import LABELS, Query, make_queries
from incentive.geter.sft import GeterSFT, answer
from incentive.models import load_tokenizer
from incentive.models.soft_prefix import SoftPrefix
from incentive.paths import empty_run_dir
from incentive.training.checkpoint import seed_everything
from incentive.training.metrics import MetricsLog
from incentive.training.optim import build_optimizer, build_scheduler
from incentive.training.policy import build_policy, trainable_parameters


def say(text: str) -> None:
    print(f"[geter] {text}", flush=True)


def build_queries(cfg: GeterConfig) -> tuple[TemporalGraph, list[Query], list[Query]]:
    """The graph, and its training queries (days before the split) and eval queries (days from it on)."""
    g = cfg.graph
    graph = generate_graph(g)
    try:
        train = make_queries(graph, range(g.window, g.split), g.train_queries, g.seed + 1, g.window, g.max_history)
        held = make_queries(graph, range(g.split, g.timestamps), g.eval_queries, g.seed + 2, g.window, g.max_history)
    except ValueError as err:
        raise ConfigError(f"graph: {err}") from err
    return graph, train, held


def write_queries(path: Path, graph: TemporalGraph, queries: list[Query], with_history: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for q in queries:
            row = {"quad": list(q.quad), "label": q.label, "prompt": user_text(graph, q, with_history)}
            fh.write(json.dumps({**row, "answer": q.answer}) + "\n")


def graph_features(
    cfg: GeterConfig, graph: TemporalGraph, queries: list[Query], metrics: MetricsLog, run_dir: Path
) -> torch.Tensor | None:
    """g for every query (rows in order), from the encoder ``encoder.kind`` names; None for ``none``."""
    enc = cfg.encoder
    if enc.kind == "none":
        return None
    encoder = None
    if enc.kind == "regcn":
        encoder = TemporalEncoder(len(graph.entities), len(graph.relations), enc.dim, enc.layers, enc.history)
        embedder = GraphEmbedder(graph, encoder, enc.dim, cfg.run.seed)
        split = cfg.graph.split
        with tqdm(total=enc.steps, desc="encoder", unit="step") as bar:

            def report(step: int, loss: float) -> None:
                metrics.write({"stage": "encoder", "step": step, "loss": loss})
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")

            steps, per_step = enc.steps, enc.timestamps_per_step
            train_encoder(encoder, embedder.edges, range(split), steps, enc.lr, per_step, cfg.run.seed, report)
        mrr = {
            "train": mean_reciprocal_rank(encoder, embedder.edges, range(1, split)),
            "eval": mean_reciprocal_rank(encoder, embedder.edges, range(split, graph.timestamps)),
        }
        metrics.write({"stage": "encoder_eval", "step": enc.steps, **{f"mrr/{k}": v for k, v in mrr.items()}})
        say(
            f"encoder link prediction: MRR {mrr['train']:.3f} on training days, {mrr['eval']:.3f} on eval days "
            f"(chance ~{1 / len(graph.entities):.3f})"
        )
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, run_dir / "encoder.safetensors")
    else:
        embedder = GraphEmbedder(graph, None, enc.dim, cfg.run.seed)
    return torch.stack([embedder.pooled(q.quad, q.history) for q in queries])


def run_geter(cfg: GeterConfig, run_dir: Path, overwrite: bool = False) -> dict[str, Any]:
    """The whole run in ``run_dir``; returns the eval summary (also in eval.json)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    graph, train, held = build_queries(cfg)
    empty_run_dir(run_dir, overwrite)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    with_history = cfg.graph.history_in_prompt
    write_queries(run_dir / "data" / "train.jsonl", graph, train, with_history)
    write_queries(run_dir / "data" / "eval.jsonl", graph, held, with_history)
    counts = {label: sum(q.label == label for q in train) for label in LABELS}
    say(
        f"graph: {len(graph.entities)} entities, {len(graph.relations)} relations, {len(graph.events)} events "
        f"over {graph.timestamps} days; queries: {len(train)} training {counts}, {len(held)} eval"
    )
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    features = graph_features(cfg, graph, train + held, metrics, run_dir)
    train_features = None if features is None else features[: len(train)]
    eval_features = None if features is None else features[len(train) :]

    tokenizer = load_tokenizer(cfg.model.name)
    policy = build_policy(ModelConfig(name=cfg.model.name, lora=cfg.model.lora))
    projector = None
    params = [{"params": trainable_parameters(policy)}]
    if features is not None:
        projector = SoftPrefix(features.shape[1], policy.config.hidden_size, cfg.prefix.tokens)
        params.append({"params": list(projector.parameters()), "lr": cfg.sft.projector_lr or cfg.optim.lr})
    if projector is None:
        say("no graph token")
    else:
        say(
            f"graph token: {cfg.encoder.kind} embedding, {projector.proj.in_features} values → "
            f"{cfg.prefix.tokens} x {projector.hidden_size} at {cfg.prefix.position}"
        )
    encode_all = [encode(tokenizer, graph, q, with_history, cfg.prefix.position) for q in train + held]
    train_items, eval_items = encode_all[: len(train)], encode_all[len(train) :]

    if cfg.sft.steps:
        optimizer = build_optimizer(params, cfg.optim)  # type: ignore[arg-type]
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.sft.steps)
        trainer = GeterSFT(
            policy,
            projector,
            train_items,
            train_features,
            cfg.sft.batch_size,
            optimizer,
            scheduler,
            cfg.optim.max_grad_norm,
            cfg.run.seed,
            tokenizer.pad_token_id,
        )
        with tqdm(range(1, cfg.sft.steps + 1), desc="SFT", unit="step") as bar:
            for step in bar:
                record = trainer.step(step)
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")

    rows = []
    size = cfg.eval.batch_size
    with tqdm(total=len(held), desc="eval", unit="query") as bar:
        for first in range(0, len(held), size):
            part = slice(first, first + size)
            feats = None if eval_features is None else eval_features[part]
            responses = answer(policy, tokenizer, projector, eval_items[part], feats, cfg.eval.max_new_tokens)
            for query, response in zip(held[part], responses, strict=True):
                rows.append(
                    {
                        "quad": list(query.quad),
                        "label": query.label,
                        "reference": query.answer,
                        "response": response,
                        **score(response, query.answer, query.label),
                    }
                )
            bar.update(len(responses))
    summary = summarize(rows)
    metrics.write({"stage": "eval", "step": cfg.sft.steps, **{f"eval/{k}": v for k, v in summary.items()}})
    (run_dir / "eval.json").write_text(json.dumps({"summary": summary, "queries": rows}, indent=1))
    policy.save_pretrained(run_dir / "policy")
    tokenizer.save_pretrained(run_dir / "policy")
    if projector is not None:
        save_file(projector.state_dict(), run_dir / "projector.safetensors")
    low, high = summary["label_accuracy_ci"]
    say(
        f"eval: label accuracy {summary['label_accuracy']:.1%} (95% CI {low:.1%}-{high:.1%}), invalid "
        f"{summary['invalid_rate']:.1%}, explanation ROUGE-L {summary['rouge_l']:.3f} "
        f"on {summary['queries']} queries"
    )
    return summary
