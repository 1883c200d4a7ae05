"""GETER: the event generator (seeded, labels that follow from the graph), the encoder (shapes, pooling, link
prediction that learns, no look-ahead), the graph token's place and the assistant-only loss, the metrics and the
ablation's verdict on hand examples, bad recipes, and a short run end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from incentive.cli import main
from incentive.config import ConfigError
from incentive.geter.cli import DEFAULT_RECIPE
from incentive.geter.config import GeterConfig, GraphConfig, load_config
from incentive.geter.encoder import (
    GraphEmbedder,
    TemporalEncoder,
    day_edges,
    mean_reciprocal_rank,
    pool,
    train_encoder,
)
from incentive.geter.events import Quad, Relation, Rule, TemporalGraph, entity_name, generate_graph
from incentive.geter.metrics import ablation_verdict, explanation, parse_label, rouge_l, score, summarize
from incentive.geter.pipeline import build_queries
from incentive.geter.prompts import encode
from incentive.geter.queries import answer_text, label_of, premise_objects, retrieve
from incentive.geter.sft import GeterSFT, answer
from incentive.models.soft_prefix import IGNORE, SoftPrefix, embed_with_prefix

SMALL = GeterConfig(
    graph=GraphConfig(entities=12, timestamps=30, events_per_step=4, train_queries=12, eval_queries=6)
)


def hand_graph() -> TemporalGraph:
    """Four countries, one rule (negotiate on day t → sign on day t + 2) and three facts."""
    relations = (Relation("negotiate with", "negotiated with"), Relation("sign with", "signed with"))
    events = (Quad(0, 0, 1, 3), Quad(2, 0, 3, 4), Quad(0, 1, 1, 5))
    return TemporalGraph(("A", "B", "C", "D"), relations, (Rule(0, 1, 2),), events, 8)


def test_the_generator_is_seeded() -> None:
    first, again = generate_graph(SMALL.graph), generate_graph(SMALL.graph)
    other = generate_graph(SMALL.graph.model_copy(update={"seed": 1}))
    assert first == again and first.events != other.events
    assert len({entity_name(i) for i in range(4900)}) == 4900
    assert all(e.s != e.o and 0 <= e.t < 30 for e in first.events)


def test_consequences_follow_their_premises() -> None:
    graph = generate_graph(SMALL.graph)
    events = set(graph.events)
    for rule in graph.rules:
        for e in graph.events:
            if e.r == rule.consequence:
                assert Quad(e.s, rule.premise, e.o, e.t - rule.lag) in events


def test_labels_follow_from_the_graph_history() -> None:
    graph, train, held = build_queries(SMALL)
    events = set(graph.events)
    for query in train + held:
        assert query.label == label_of(graph, query.quad)  # from the whole graph
        assert answer_text(graph, query.quad, query.history)[0] == query.label  # from the retrieved facts only
        assert query.answer.lower().startswith(query.label)
        assert (query.quad in events) == (query.label == "yes")
        assert all(query.quad.t - 4 <= f.t < query.quad.t for f in query.history)
    assert sorted(q.label for q in train) == ["no"] * 4 + ["unsure"] * 4 + ["yes"] * 4
    split = int(30 * 0.7)
    assert all(q.quad.t < split for q in train) and all(q.quad.t >= split for q in held)


def test_labels_and_explanations_on_a_hand_graph() -> None:
    graph = hand_graph()
    yes, no, unsure = Quad(0, 1, 1, 5), Quad(0, 1, 2, 5), Quad(1, 1, 0, 5)
    assert [label_of(graph, q) for q in (yes, no, unsure)] == ["yes", "no", "unsure"]
    assert premise_objects(graph.events, graph, no) == [1]
    assert answer_text(graph, yes, retrieve(graph, yes, 4, 6)) == (
        "yes",
        "Yes. A negotiated with B on day 3, and those who negotiate with someone usually sign with them "
        "2 days later.",
    )
    assert answer_text(graph, no, retrieve(graph, no, 4, 6))[1] == (
        "No. A negotiated with B on day 3, not C, so A would rather sign with B on day 5."
    )
    assert answer_text(graph, unsure, retrieve(graph, unsure, 4, 6))[1].startswith(
        "Unsure. Nothing in the history shows that B negotiated with anyone on day 3"
    )
    # the premise is retrieved first even when one fact is all the budget allows
    assert retrieve(graph, Quad(0, 1, 3, 5), 4, 1) == (Quad(0, 0, 1, 3),)
    assert retrieve(graph, Quad(3, 1, 2, 6), 4, 6) == (Quad(2, 0, 3, 4),)


def test_pooling_is_the_mean_of_the_concatenated_rows() -> None:
    entities = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    relations = torch.tensor([[5.0, 5.0], [7.0, 7.0]])
    alone = pool(entities, relations, [Quad(0, 1, 2, 9)])
    assert alone.tolist() == [1.0, 0.0, 7.0, 7.0, 2.0, 2.0]  # [E_s; R_r; E_o]
    with_history = pool(entities, relations, [Quad(0, 1, 2, 9), Quad(1, 0, 0, 8)])
    assert with_history.tolist() == [0.5, 0.5, 6.0, 6.0, 1.5, 1.0]
    assert with_history.shape == (3 * 2,)


def test_encoder_shapes_and_no_look_ahead() -> None:
    graph = generate_graph(SMALL.graph)
    torch.manual_seed(0)
    encoder = TemporalEncoder(12, len(graph.relations), 8, 2, 3)
    embedder = GraphEmbedder(graph, encoder, 8, 0)
    h = embedder.entities_before(10)
    assert h.shape == (12, 8)
    s, r, _ = embedder.edges[10]
    assert encoder.scores(h, s, r).shape == (len(s), 12)
    assert embedder.pooled(Quad(0, 1, 2, 10), [Quad(3, 0, 4, 9)]).shape == (24,)
    changed = list(embedder.edges)
    changed[10] = day_edges(hand_graph(), 5)  # day 10's own facts do not shape the embeddings as of day 10
    assert torch.equal(encoder.evolve(changed[7:10]), h)
    random = GraphEmbedder(graph, None, 8, 0)
    assert torch.equal(random.entities_before(3), random.entities_before(25))  # a frozen table: no time


def test_link_prediction_loss_decreases_on_a_toy_graph() -> None:
    graph = generate_graph(SMALL.graph)
    torch.manual_seed(0)
    encoder = TemporalEncoder(12, len(graph.relations), 16, 1, 3)
    edges = [day_edges(graph, t) for t in range(graph.timestamps)]
    before = mean_reciprocal_rank(encoder, edges, range(1, 21))
    losses = train_encoder(encoder, edges, range(21), 60, 0.02, 4, 0)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:3]) / 3
    assert mean_reciprocal_rank(encoder, edges, range(1, 21)) > before


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from incentive.models import load_tokenizer

    return load_tokenizer("tiny-random")


def test_graph_token_position_and_assistant_only_loss(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    graph, train, _ = build_queries(SMALL)
    start = encode(tok, graph, train[0], True, "start")
    marked = encode(tok, graph, train[0], True, "before_query")
    assert start.at == 0
    assert tok.decode(marked.prompt[: marked.at]).endswith("<|im_start|>user\n")
    assert tok.decode(marked.prompt[marked.at :]).startswith("Query: is it plausible that")
    assert tok.decode(start.answer) == train[0].answer + tok.eos_token
    embed = torch.nn.Embedding(len(tok), 4)
    batch = embed_with_prefix(embed, [start.row], torch.zeros(1, 1, 4), [start.at], [start.loss_mask])
    labels = batch.labels[0]
    assert labels[0] == IGNORE  # the graph token
    assert (labels[1 : 1 + len(start.prompt)] == IGNORE).all()  # system, user and the assistant header
    assert labels[1 + len(start.prompt) :].tolist() == start.answer
    assert batch.inputs_embeds.shape == (1, len(start.row) + 1, 4) and batch.attention_mask[0, 0] == 1


def test_parse_label_and_explanation() -> None:
    assert parse_label("Yes. Because") == "yes"
    assert parse_label("  UNSURE, nothing shows") == "unsure"
    assert parse_label("no") == "no"
    assert parse_label("Maybe yes") is None and parse_label("Yesterday") is None and parse_label("") is None
    assert explanation("No. A did it.") == "A did it."


def test_rouge_l_by_hand() -> None:
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)  # LCS 3: P 1, R 1/2
    assert rouge_l("a b c d", "a c b d") == pytest.approx(0.75)  # LCS 3 (a b d): P = R = 3/4
    assert rouge_l("The Cat", "the cat") == 1.0
    assert rouge_l("", "x") == 0.0 and rouge_l("x y", "z") == 0.0


def test_summary_by_hand() -> None:
    rows = [
        {"label": "yes", **score("Yes. A met B.", "Yes. A met B.", "yes")},
        {"label": "no", **score("Yes. A met C.", "No. A met B.", "no")},
        {"label": "no", **score("Perhaps", "No. A met B.", "no")},
        {"label": "unsure", **score("unsure", "Unsure. Nothing.", "unsure")},
    ]
    summary = summarize(rows)
    assert summary["label_accuracy"] == 0.5 and summary["invalid_rate"] == 0.25
    assert summary["accuracy/yes"] == 1.0 and summary["accuracy/no"] == 0.0
    assert summary["rouge_l"] == pytest.approx((1.0 + 2 / 3 + 0.0 + 0.0) / 4)


def test_the_ablation_catches_a_random_embedding_scoring_as_well() -> None:
    same = ablation_verdict([True, False, True, True] * 5, [True, False, True, True] * 5)
    assert not same["trained_better"] and same["diff"] == 0 and same["p_value"] == 1.0
    assert "random embedding scores as well" in same["verdict"]
    close = ablation_verdict([True] * 12 + [False] * 8, [True] * 10 + [False] * 10)
    assert not close["trained_better"] and close["p_value"] == pytest.approx(0.5)
    apart = ablation_verdict([True] * 20, [False] * 20)
    assert apart["trained_better"] and apart["p_value"] == pytest.approx(2 * 0.5**20)
    with pytest.raises(ValueError, match="same"):
        ablation_verdict([True], [True, False])


def test_one_sft_step_trains_the_projector_not_the_frozen_base(tiny_tokenizer) -> None:
    from peft import LoraConfig, get_peft_model

    from incentive.models import load_model

    tok = tiny_tokenizer
    graph, train, _ = build_queries(SMALL)
    items = [encode(tok, graph, q, True, "start") for q in train[:4]]
    policy = get_peft_model(load_model("tiny-random"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    projector = SoftPrefix(24, policy.config.hidden_size)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    before = projector.proj.weight.detach().clone()
    params = [p for p in policy.parameters() if p.requires_grad] + list(projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    features = torch.randn(4, 24)
    trainer = GeterSFT(policy, projector, items, features, 2, optimizer, scheduler, 1.0, 0, tok.pad_token_id)
    record = trainer.step(1)
    assert record["tokens"] > 0 and record["loss"] > 0
    assert not torch.equal(projector.proj.weight, before)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if not p.requires_grad)

    calls = []
    handle = projector.register_forward_hook(lambda *_: calls.append(1))
    try:
        answers = answer(policy, tok, projector, items[:2], torch.randn(2, 24), max_new_tokens=5)
    finally:
        handle.remove()
    assert len(answers) == 2 and len(calls) == 1  # one projector call, however many tokens are decoded


def test_the_bundled_recipe_loads() -> None:
    cfg = load_config(DEFAULT_RECIPE)
    assert cfg.encoder.kind == "regcn" and cfg.prefix.tokens == 1 and cfg.model.lora is not None


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["encoder.kind=gcn"], "encoder.kind = 'gcn': should be 'regcn', 'random' or 'none'"),
        (["graph.entitys=9"], "graph.entitys: unknown key; did you mean 'entities'?"),
        (["graph.window=1"], "graph: window (1) is shorter than the longest rule lag (3 days)"),
        (["sft.steps=-1"], "sft.steps = -1: should be greater than or equal to 0"),
    ],
)
def test_a_bad_recipe_is_one_error_line_naming_the_key(sets, expected, tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match=f"--set {sets[0]}") as err:
        load_config(DEFAULT_RECIPE, sets)
    assert expected in str(err.value) and "\n" not in str(err.value)
    args = ["geter", str(DEFAULT_RECIPE), "--run-dir", str(tmp_path / "run")]
    assert main([*args, *[x for s in sets for x in ("--set", s)]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


TINY_RUN = [
    "model.name=tiny-random",
    "model.lora=null",
    "graph.entities=12",
    "graph.timestamps=30",
    "graph.events_per_step=4",
    "graph.train_queries=12",
    "graph.eval_queries=6",
    "encoder.steps=5",
    "sft.steps=2",
    "sft.batch_size=4",
    "eval.max_new_tokens=6",
]


@pytest.mark.parametrize("kind", ["regcn", "none"])
def test_a_short_run_end_to_end(kind, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    sets = [*TINY_RUN, f"encoder.kind={kind}"]
    assert main(["geter", "--run-dir", str(run_dir), *[x for s in sets for x in ("--set", s)]]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records]
    assert stages.count("sft") == 2 and stages[-1] == "eval"
    assert stages.count("encoder") == (5 if kind == "regcn" else 0)
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["summary"]["queries"] == 6 and len(result["queries"]) == 6
    assert (run_dir / "projector.safetensors").exists() == (kind == "regcn")
    assert (run_dir / "policy" / "model.safetensors").exists()
    assert len((run_dir / "data" / "train.jsonl").read_text().splitlines()) == 12
    out = capsys.readouterr().out
    assert "[geter] eval: label accuracy" in out
    assert main(["geter", "--run-dir", str(run_dir), *[x for s in sets for x in ("--set", s)]]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err


def test_run_folder_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEFAULT_RECIPE, ["run.name=x"])
    assert Path(cfg.run.output_dir) / (cfg.run.name or "geter") == Path("runs/x")
