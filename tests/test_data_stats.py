"""`incentive data-stats`: length statistics, span histogram, entropy, category shares, perplexity (scope and
sliding window), the quality filters, bad input and the command end to end; numbers computed by hand with a
tokenizer that splits on spaces and language models of known probabilities."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from incentive.analysis.data_cli import filter_names
from incentive.analysis.data_corpus import Corpus, Fields, load_corpus, make_sample, split_response
from incentive.analysis.data_filters import (
    decontaminate,
    duplicate_flags,
    ngram_flags,
    ngram_frequency,
    structure_flags,
)
from incentive.analysis.data_perplexity import perplexities, perplexity_summary, plan_windows, scored_sequence
from incentive.analysis.data_pipeline import FilterSettings, PerplexitySettings, analyse
from incentive.analysis.data_stats import (
    Bins,
    group_order,
    grouped_length_stats,
    length_stats,
    normalised_entropy,
    shares,
    span_histogram,
)
from incentive.cli import main


class SpaceTokenizer:
    """Splits on spaces; each new word gets the next id."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.vocab.setdefault(word, len(self.vocab)) for word in text.split()] for text in texts]


def uniform_lm(vocab: int):
    """Every token has probability 1 / vocab, whatever came before."""

    def score(contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[list[float]]:
        return [[-math.log(vocab)] * len(target) for target in targets]

    return score


def response(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"


def words(n: int, word: str = "w") -> str:
    return " ".join(f"{word}{i}" for i in range(n))


# 1. Lengths


def test_length_stats_match_numpy_and_count_empty_responses() -> None:
    texts = ("a b c", "", "a b c d e f g", "a", "a b c d e f g h i j k")
    samples = [make_sample("p", text) for text in texts]
    lengths = [len(ids) for ids in SpaceTokenizer()([s.response for s in samples])]
    assert lengths == [3, 0, 7, 1, 11]
    stats = length_stats(lengths)
    values = np.array(lengths)
    assert stats["count"] == 5 and stats["sum"] == 22 and stats["min"] == 0
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["median"] == pytest.approx(np.median(values)) == 3
    assert stats["std"] == pytest.approx(values.std())
    assert stats["iqr"] == pytest.approx(np.percentile(values, 75) - np.percentile(values, 25)) == 6
    assert stats["cv"] == pytest.approx(values.std() / values.mean())
    assert stats["p5"] == pytest.approx(np.percentile(values, 5))
    assert stats["p95"] == pytest.approx(np.percentile(values, 95))


def test_length_stats_ignore_order_and_groups_sort_stably() -> None:
    lengths = [5, 1, 9, 3, 3, 7]
    shuffled = lengths[:]
    random.Random(0).shuffle(shuffled)
    assert length_stats(lengths) == length_stats(shuffled)
    assert group_order(["b", "a", "c", "a", "b", None]) == ["b", "a", "c", "(none)"]
    grouped = grouped_length_stats([1, 2, None, 4], ["x", "y", "x", "y"])
    assert grouped["missing"] == 1
    assert grouped["all"]["count"] == 3
    assert grouped["by_group"]["x"]["count"] == 1 and grouped["by_group"]["y"]["sum"] == 6
    assert length_stats([]) == {"count": 0, "sum": 0}


def test_tail_masses_follow_the_bins() -> None:
    stats = length_stats([10, 20, 40, 100], Bins(32, 64))
    assert stats["share_short"] == 0.5 and stats["share_long"] == 0.25


def test_response_splits_into_reasoning_and_answer() -> None:
    assert split_response(response("a b", "c")) == ("a b", "c")
    assert split_response("<think>a b</think> the end") == ("a b", "the end")
    assert split_response("<think>a b") == (None, None)
    assert split_response("<answer>x</answer>") == (None, "x")
    assert split_response("<think></think><answer>x</answer>") == ("", "x")


# 2. Histogram and 3. bin entropy


def test_span_histogram_bins() -> None:
    bins = Bins(1024, 10240)
    counts = span_histogram([0, 1023, 1024, 10239, 10240, 50000], bins)
    assert len(counts) == bins.count == 11
    assert counts[0] == 2 and counts[1] == 1 and counts[9] == 1 and counts[10] == 2
    assert sum(counts) == 6 and counts[2:9] == [0] * 7
    labels = bins.labels()
    assert labels[0] == "[0,1024)" and labels[9] == "[9216,10240)" and labels[10] == "10240+"


def test_bins_refuse_a_cap_off_the_grid() -> None:
    with pytest.raises(ValueError, match="multiple"):
        Bins(100, 250)


def test_bin_entropy_is_normalised() -> None:
    assert normalised_entropy([0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0]) == 0.0
    assert normalised_entropy([3] * 11) == pytest.approx(1.0)
    assert normalised_entropy([0] * 11) == 0.0
    assert length_stats([5, 6, 7], Bins(1024, 10240))["bin_entropy"] == 0.0


# 4. Category tables


def test_instance_shares_sum_to_one() -> None:
    table = shares(["math", "code", "math", None])
    assert table["math"] == {"instances": 2, "share": 0.5}
    assert sum(row["share"] for row in table.values()) == pytest.approx(1.0)
    assert list(table) == ["math", "code", "(none)"]


def test_token_shares_weight_by_length() -> None:
    table = shares(["a", "b"], [10, 30])
    assert table["a"]["share"] == pytest.approx(0.25) and table["b"]["share"] == pytest.approx(0.75)
    assert list(table) == ["b", "a"]
    assert shares(["a"], [0])["a"]["share"] is None


# 5. Perplexity


def test_uniform_lm_gives_the_vocabulary_size() -> None:
    vocab = 50
    encode = SpaceTokenizer()
    samples = [make_sample(words(3, "q"), words(n, "r")) for n in (1, 5, 12)]
    prompts, responses = encode([s.prompt for s in samples]), encode([s.response for s in samples])
    ids = [scored_sequence(p, r, "response") for p, r in zip(prompts, responses, strict=True)]
    results = perplexities(ids, uniform_lm(vocab), max_len=64, stride=32)
    assert [r.perplexity for r in results] == [pytest.approx(vocab, rel=1e-12)] * 3
    assert [r.tokens for r in results] == [1, 5, 12]
    assert perplexity_summary(results)["token_weighted"] == pytest.approx(vocab, rel=1e-12)


def test_response_scope_leaves_the_query_out() -> None:
    vocab, eps = 20, 1e-6
    encode = SpaceTokenizer()
    query, answer = encode([words(4, "q"), words(6, "r")])
    query_ids = set(query)

    def score(contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[list[float]]:
        return [[math.log(eps) if t in query_ids else -math.log(vocab) for t in target] for target in targets]

    (response_scope,) = perplexities([scored_sequence(query, answer, "response")], score, 64, 32)
    (full_scope,) = perplexities([scored_sequence(query, answer, "full")], score, 64, 32)
    assert response_scope.perplexity == pytest.approx(vocab, rel=1e-12) and response_scope.tokens == 6
    assert full_scope.tokens == 9  # the first query token has no context
    expected = math.exp((3 * -math.log(eps) + 6 * math.log(vocab)) / 9)
    assert full_scope.perplexity == pytest.approx(expected)


def test_windows_score_every_position_once() -> None:
    for length, first, max_len, stride in [(50, 1, 16, 8), (50, 30, 16, 5), (10, 0, 16, 8), (33, 1, 8, 8)]:
        windows = plan_windows(length, first, max_len, stride)
        scored = [p for w in windows for p in range(w.score_from, w.end)]
        assert scored == list(range(max(first, 1), length))
        assert all(w.end - w.begin <= max_len and w.begin < w.score_from for w in windows)
    assert plan_windows(1, 0, 8, 4) == []
    with pytest.raises(ValueError):
        plan_windows(10, 1, 8, 9)


def test_sliding_window_passes_the_window_as_context() -> None:
    seen: list[tuple[list[int], list[int]]] = []

    def record(contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[list[float]]:
        seen.extend((list(c), list(t)) for c, t in zip(contexts, targets, strict=True))
        return [[-1.0] * len(t) for t in targets]

    tokens = list(range(100, 130))
    (result,) = perplexities([(tokens, 1)], record, max_len=10, stride=5)
    assert result.truncated and result.windows == len(seen) == 5 and result.tokens == 29
    assert result.perplexity == pytest.approx(math.e)
    for context, target in sorted(seen):
        start = tokens.index(context[0])
        assert tokens[start : start + len(context) + len(target)] == context + target
        assert len(context) + len(target) <= 10


def test_sliding_window_equals_full_context_when_it_fits(tiny) -> None:
    from incentive.analysis.data_perplexity import model_scorer

    model, _ = tiny
    score = model_scorer(model)
    rng = random.Random(0)
    sequences = [([rng.randrange(1000) for _ in range(n)], 5) for n in (12, 40)]
    fits = perplexities(sequences, score, max_len=40, stride=20)
    roomy = perplexities(sequences, score, max_len=512, stride=256)
    direct = [-sum(score([tokens[:5]], [tokens[5:]])[0]) for tokens, _ in sequences]
    for a, b, nll in zip(fits, roomy, direct, strict=True):
        assert not a.truncated and a.windows == 1
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6)
        assert a.nll == pytest.approx(nll, rel=1e-6)
    (cut,) = perplexities(sequences[1:], score, max_len=16, stride=8)
    assert cut.truncated and cut.tokens == 35 and math.isfinite(cut.perplexity)


def test_empty_response_is_unscored() -> None:
    (result,) = perplexities([scored_sequence([1, 2], [], "response")], uniform_lm(9), 16, 8)
    assert result.perplexity is None
    assert perplexity_summary([result])["unscored"] == 1


def test_perplexity_share_scores_the_same_prompts_in_every_corpus() -> None:
    prompts = [f"prompt {i}" for i in range(40)]
    ppl = PerplexitySettings(uniform_lm(5), SpaceTokenizer(), share=0.5)
    picked = []
    for style in ("short", "long words here"):
        samples = [make_sample(p, response(style, "a")) for p in prompts]
        report = analyse(Corpus(style, style, samples), SpaceTokenizer(), Bins(8, 32), ppl=ppl)
        picked.append([v is not None for v in report.perplexity])
        assert report.stats["perplexity"]["rows_scored"] == sum(picked[-1])
    assert picked[0] == picked[1] and 0 < sum(picked[0]) < len(prompts)


# 6. n-gram filter


def test_ngram_threshold_is_more_than_min_count() -> None:
    encode = SpaceTokenizer()
    gram = words(20, "g")
    for repeats, flagged in ((21, True), (20, False)):
        texts = [f"{gram} tail{i}" for i in range(repeats)] + [words(25, "x")]
        ids = encode(texts)
        found = ngram_frequency(ids, n=20, min_count=20)
        assert bool(found) is flagged
        assert ngram_flags(found, ids, 20) == [flagged] * repeats + [False]
    loop = encode([" ".join(["again and again"] * 30)])
    assert ngram_frequency(loop, n=20, min_count=20)  # a loop repeats its n-grams within one row


# 7. Decontamination, and the other filters


def test_exact_match_removes_a_verbatim_eval_item() -> None:
    reasons = decontaminate(["What is 2 + 2?", "what  is 2 + 2? ", "What is 3 + 3?"], ["What is 2 + 2?"])
    assert reasons == ["exact", "exact", None]


def test_embedding_threshold() -> None:
    vectors = {
        "eval": [1.0, 0.0],
        "close paraphrase": [0.95, math.sqrt(1 - 0.95**2)],
        "loose paraphrase": [0.85, math.sqrt(1 - 0.85**2)],
    }

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.array([vectors[t] for t in texts])

    reasons = decontaminate(["close paraphrase", "loose paraphrase"], ["eval"], embed, threshold=0.9)
    assert reasons == ["cosine 0.950", None]


def test_structure_and_duplicate_filters() -> None:
    samples = [
        make_sample("p1", response("r", "a")),
        make_sample("p2", "<think>cut off"),
        make_sample("p3", response("r", "")),
        make_sample("p1", response("other", "a")),
        make_sample("p4", "<think>r</think> a"),
    ]
    assert structure_flags(samples) == [False, True, True, False, False]
    assert duplicate_flags(samples, "prompt") == [False, False, False, True, False]
    assert duplicate_flags(samples, "pair") == [False] * 5


def test_filters_run_in_order_and_report_removals() -> None:
    samples = [
        make_sample("a", response("x", "1"), row=1),
        make_sample("a", response("x", "1"), row=2),
        make_sample("b", "<think>x", row=3),
        make_sample("held out", response("x", "2"), row=4),
        make_sample("c", response("y", "3"), row=5),
    ]
    settings = FilterSettings(("dedup", "decontam", "structure"), eval_prompts=("Held  out",))
    report = analyse(Corpus("t", "t.jsonl", samples), SpaceTokenizer(), Bins(4, 8), settings)
    assert [(f["filter"], f["removed"], f["rows"]) for f in report.filters] == [
        ("dedup", 1, [2]),
        ("decontam", 1, [4]),
        ("structure", 1, [3]),
    ]
    assert [s.row for s in report.kept] == [1, 5]
    assert report.stats["kept"] == 2 and report.stats["lengths"]["response"]["all"]["count"] == 2


def test_filter_names_expand_all() -> None:
    assert filter_names(["all"], False) == ("dedup", "ngram", "structure")
    assert filter_names(["structure", "all"], True) == ("structure", "dedup", "decontam", "ngram")
    with pytest.raises(ValueError, match="eval"):
        FilterSettings(("decontam",))


def test_analyse_counts_tokens_by_category_and_difficulty() -> None:
    samples = [
        make_sample("p", response(words(4), words(2)), "math", "easy"),
        make_sample("q", response(words(24), words(2)), "code", "hard"),
    ]
    ppl = PerplexitySettings(uniform_lm(7), SpaceTokenizer())
    stats = analyse(Corpus("t", "t", samples), SpaceTokenizer(), Bins(8, 32), ppl=ppl).stats
    # each response is its words plus four tag tokens: <think> </think> <answer> </answer>
    assert stats["lengths"]["response"]["all"]["sum"] == 10 + 30
    assert stats["category"]["token"]["math"]["share"] == pytest.approx(0.25)
    assert stats["difficulty"]["token"]["hard"]["share"] == pytest.approx(0.75)
    assert stats["histogram"]["all"] == [0, 1, 0, 1, 0]
    assert stats["perplexity"]["all"]["mean"] == pytest.approx(7)
    assert stats["lengths"]["reasoning"]["all"]["sum"] == 28


# Bad input and the command end to end


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "p"}, "row 2, field 'response': missing"),
        ({"prompt": 3, "response": "r"}, "row 2, field 'prompt': must be a string, got int"),
        ({"prompt": "p", "response": "r", "category": ["x"]}, "row 2, field 'category': must be a string or"),
    ],
)
def test_bad_row_is_one_error_line(tmp_path: Path, capsys, row: dict, expected: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, row])
    code = main(["data-stats", str(path), "--no-perplexity", "--out", str(tmp_path / "out")])
    assert code == 2
    assert error_line(capsys.readouterr().err).startswith(f"error: {path}, {expected}")
    assert not (tmp_path / "out").exists()


def test_bad_options_are_one_error_line(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "response": "r"}])
    assert main(["data-stats", str(path), "--filter", "decontam"]) == 2
    assert "--eval-set" in error_line(capsys.readouterr().err)
    assert main(["data-stats", str(path), "--bin-width", "100", "--cap", "250"]) == 2
    assert "multiple" in error_line(capsys.readouterr().err)
    assert main(["data-stats", str(tmp_path / "data.txt")]) == 2
    assert "unsupported file extension" in error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as stop:
        main(["data-stats", str(path), "--perplexity-share", "0"])
    assert stop.value.code == 2
    assert "--perplexity-share" in error_line(capsys.readouterr().err)


def test_load_corpus_reads_fields_and_tasks(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "teacher.jsonl",
        [{"query": "q", "answer_text": response("r", "a"), "category": "math", "difficulty": 3}],
    )
    (sample,) = load_corpus(str(path), Fields(prompt="query", response="answer_text")).samples
    got = (sample.prompt, sample.reasoning, sample.answer, sample.difficulty, sample.row)
    assert got == ("q", "r", "a", "3", 1)
    task = load_corpus("task:chain_sum", size=3, seed=1)
    assert task.label == "chain_sum" and len(task.samples) == 3
    assert all(s.reasoning is not None and s.answer == s.record["reference"] for s in task.samples)


def test_command_end_to_end(tmp_path: Path, capsys) -> None:
    rows = [
        {"prompt": "What is 2 + 3?", "response": response("2 + 3 = 5", "5"), "category": "math", "id": 1},
        {"prompt": "What is 4 + 4?", "response": response("4 + 4 = 8", "8"), "category": "math", "id": 2},
        {"prompt": "Say hi.", "response": response("A greeting.", "Hi!"), "category": "chat", "id": 3},
        {"prompt": "Say bye.", "response": "<think>I was cut off", "category": "chat", "id": 4},
        {"prompt": "What is 2 + 3?", "response": response("5", "5"), "category": "math", "id": 5},
    ]
    other = [{"prompt": "Name a colour.", "response": response("Red is one.", "red"), "category": "chat"}]
    a = write_jsonl(tmp_path / "teacher_a.jsonl", rows)
    b = write_jsonl(tmp_path / "teacher_b.jsonl", other)
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "what is 4 + 4?", "reference": "8"}])
    out = tmp_path / "out"
    args = ["data-stats", str(a), str(b), "--model", "tiny-random", "--filter", "all"]
    args += ["--eval-set", str(evals), "--bin-width", "8", "--cap", "32", "--max-len", "64"]
    args += ["--out", str(out)]
    assert main([*args, "--write-filtered", str(tmp_path / "kept")]) == 0
    printed = capsys.readouterr().out
    assert "| | teacher_a | teacher_b |" in printed
    stats = json.loads((out / "stats.json").read_text())
    first = stats["corpora"][0]
    assert {f["filter"]: f["removed"] for f in first["filters"]} == {
        "dedup": 1,
        "decontam": 1,
        "ngram": 0,
        "structure": 1,
    }
    assert first["kept"] == 2 and first["perplexity"]["all"]["count"] == 2
    assert first["category"]["instance"]["math"]["share"] == 0.5
    assert stats["settings"]["model"] == "tiny-random" and stats["comparison"][1]["kept"] == 1
    html = (out / "data-stats.html").read_text()
    assert "teacher_b" in html and "data:image/png;base64," in html
    assert {p.name for p in out.glob("*.png")} >= {"histogram.png", "lengths.png", "perplexity.png"}
    kept = [json.loads(line) for line in (tmp_path / "kept" / "teacher_a.jsonl").read_text().splitlines()]
    assert [row["id"] for row in kept] == [1, 3]
    assert kept[0] == rows[0]


def test_write_filtered_single_source_goes_to_the_path(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "response": response("r", "a")}, {"prompt": "q", "response": "no tags"}]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    target = tmp_path / "clean.jsonl"
    args = ["data-stats", str(path), "--no-perplexity", "--model", "tiny-random", "--filter", "structure"]
    assert main([*args, "--out", str(tmp_path / "out"), "--write-filtered", str(target)]) == 0
    assert [json.loads(line) for line in target.read_text().splitlines()] == rows[:1]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["corpora"][0]["perplexity"] is None
