"""Multi-turn tool rollouts (Pixel Reasoner, spec methods/pixel-reasoner.md §7–9): the tools, the call protocol, the
episode loop's termination and loss mask, the tool-aware verifier, and observation masking in SFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from incentive.data.example import Example
from incentive.engines import CachedEngine, SamplingParams
from incentive.engines.cached import Turn
from incentive.engines.tools import ToolEngine
from incentive.rewards.base import RewardContext
from incentive.rewards.curiosity import CuriosityBonus, ToolAwareVerifier
from incentive.rollout.types import Completion, RolloutBatch
from incentive.templates import TagFormat
from incentive.tools import CallProtocol, observe
from incentive.tools.grid import CropGrid, SelectFrames, crop_box
from incentive.tools.grid_data import make_rows
from incentive.training.sft import ObservationMaskingEncoder

GRID = ["0123", "4567", "8901", "2345"]
EXAMPLE = Example(
    prompt="p", reference="6", metadata={"grid": GRID, "frames": [f"f{i}" for i in range(1, 17)]}
)
PROTOCOL = CallProtocol()
TOOLS = {"crop_grid": CropGrid(), "select_frames": SelectFrames()}


def call(name: str, **arguments: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_normalised_box_is_padded_by_a_tenth_and_clamped() -> None:
    assert crop_box([0.2, 0.2, 0.4, 0.4], 10, 10, 0.1) == (1, 1, 5, 5)
    assert crop_box([0.0, 0.0, 0.05, 0.05], 10, 10, 0.1) == (0, 0, 2, 2)  # clamped at 0
    assert crop_box([0.9, 0.5, 0.99, 0.6], 10, 10, 0.1) == (8, 4, 10, 7)  # clamped at 1


def test_cell_box_is_normalised_first() -> None:
    # [2, 3, 4, 5] on 8x8 → [0.25, 0.375, 0.5, 0.625] → padded [0.15, 0.275, 0.6, 0.725] → cells 1-5, 2-6
    assert crop_box([2, 3, 4, 5], 8, 8, 0.1) == (1, 2, 5, 6)
    assert crop_box([0, 0, 1, 1], 8, 8, 0.0) == (
        0,
        0,
        1,
        1,
    )  # the release's rule: a value of 1 or more is cells


def test_crop_returns_numbered_cells() -> None:
    out = CropGrid()({"bbox_2d": [1, 1, 2, 2]}, EXAMPLE)  # cell (2, 2), padded to rows/cols 1-3
    assert out.splitlines() == [
        "Here is the cropped grid (rows 1-3, columns 1-3):",
        "row 1: 0 1 2",
        "row 2: 4 5 6",
        "row 3: 8 9 0",
    ]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (call("crop_grid", bbox_2d=[0, 0, 1, 1]), "Execution error: the crop is 1x1 cells, smaller than"),
        (call("crop_grid", bbox_2d=[2, 1, 1, 2]), "Execution error: the box [2.0, 1.0, 1.0, 2.0] is empty"),
        (call("crop_grid", bbox_2d=[1, 2]), "'bbox_2d' must be a list of 4 numbers"),
        (call("select_frames", target_frames=list(range(1, 10))), "at most 8 frames per call, got 9"),
        (
            call("select_frames", target_frames=[0, 17]),
            "frames [0, 17] do not exist: the video has frames 1-16",
        ),
        (call("rotate"), "unknown tool 'rotate'; available: crop_grid, select_frames"),
        ("<tool_call>{not json}</tool_call>", "the call is not valid JSON"),
        ('<tool_call>["crop_grid"]</tool_call>', 'a JSON object with a "name"'),
    ],
)
def test_bad_calls_come_back_as_execution_errors(text: str, words: str) -> None:
    small = {"crop_grid": CropGrid(pad=0.0, min_cells=2), "select_frames": SelectFrames()}
    observation, failed = observe(small, text, PROTOCOL, EXAMPLE)
    assert failed
    assert observation.startswith("Execution error: ")
    assert words in observation


def test_select_frames_and_last_call_wins() -> None:
    text = call("crop_grid", bbox_2d=[0, 0, 1, 1]) + " then " + call("select_frames", target_frames=[2, 16])
    observation, failed = observe(TOOLS, text, PROTOCOL, EXAMPLE)
    assert not failed
    assert observation == "Here are the selected frames:\nframe 2: f2\nframe 16: f16"
    assert PROTOCOL.count(text) == 2


class OneEpisode(CachedEngine):
    """Stands in for the decode loop of one rollout: each turn writes the next text of a script."""

    def __init__(self, tiny, script: list[str]) -> None:
        super().__init__(*tiny)
        self.script = script
        self.seen: list[list[int]] = []

    def decode(self, contexts, params, limits=None, stop_text=None) -> list[Turn]:
        assert len(contexts) == 1
        self.seen.append(list(contexts[0]))
        text = self.script.pop(0)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        limit = limits[0] if limits else params.max_new_tokens
        ended = "stop" if stop_text and text.endswith(stop_text) else "eos"
        if len(ids) > limit:
            ids, ended = ids[:limit], "length"
        return [Turn(ids, [-0.5] * len(ids), ended)]


def run_episode(tiny, script: list[str], max_new_tokens: int = 400, **kw) -> tuple[Completion, OneEpisode]:
    decoder = OneEpisode(tiny, script)
    engine = ToolEngine(decoder, TOOLS, PROTOCOL, **kw)
    batch = engine.generate([EXAMPLE], ["Q:"], [7], SamplingParams(1, max_new_tokens, 1.0))
    return batch.completions[0], decoder


def test_episode_executes_calls_masks_observations_and_ends_without_a_call(tiny) -> None:
    _, tokenizer = tiny
    turn1 = "look " + call("crop_grid", bbox_2d=[1, 1, 2, 2])
    completion, decoder = run_episode(tiny, [turn1, " so the answer is 5"])
    observation = CropGrid()({"bbox_2d": [1, 1, 2, 2]}, EXAMPLE)
    obs_ids = tokenizer(PROTOCOL.response(observation), add_special_tokens=False).input_ids
    first = tokenizer(turn1, add_special_tokens=False).input_ids
    last = tokenizer(" so the answer is 5", add_special_tokens=False).input_ids
    assert completion.completion_ids == first + obs_ids + last
    assert completion.loss_mask == [1.0] * len(first) + [0.0] * len(obs_ids) + [1.0] * len(last)
    assert completion.logprobs[len(first) : len(first) + len(obs_ids)] == [0.0] * len(obs_ids)
    assert decoder.seen[1] == completion.prompt_ids + first + obs_ids  # the second turn saw the observation
    assert completion.info["tool_calls"] == 1 and completion.info["ended_by"] == "eos"
    assert not completion.info["final_tool_error"] and not completion.truncated
    assert "Here is the cropped grid" in completion.text and completion.group_id == 7


def test_four_calls_execute_and_a_fifth_ends_the_episode(tiny) -> None:
    _, tokenizer = tiny
    good = call("crop_grid", bbox_2d=[0, 0, 2, 2])
    completion, decoder = run_episode(tiny, [good] * 5 + ["never reached"])
    assert completion.info["tool_executed"] == 4
    assert completion.info["tool_calls"] == 5
    assert completion.info["ended_by"] == "max_calls"
    assert len(decoder.seen) == 5
    assert completion.text.count("<tool_response>") == 4


def test_unrepaired_error_is_flagged_and_a_repair_clears_it(tiny) -> None:
    _, tokenizer = tiny
    bad, good = call("crop_grid", bbox_2d=[2, 2, 1, 1]), call("crop_grid", bbox_2d=[0, 0, 2, 2])
    repaired, _ = run_episode(tiny, [bad, good, "answer"])
    assert not repaired.info["final_tool_error"] and len(repaired.info["tool_errors"]) == 1
    broken, _ = run_episode(tiny, [good, bad, "answer"])
    assert broken.info["final_tool_error"]


def test_token_budget_counts_only_what_the_policy_writes(tiny) -> None:
    _, tokenizer = tiny
    turn1 = call("crop_grid", bbox_2d=[0, 0, 2, 2])
    budget = len(tokenizer(turn1, add_special_tokens=False).input_ids) + 3
    completion, _ = run_episode(tiny, [turn1, "a b c d e f g h i j k"], max_new_tokens=budget)
    assert sum(completion.trained_mask) == budget
    assert completion.truncated and completion.info["ended_by"] == "length"


def test_context_limit_ends_the_episode(tiny) -> None:
    _, tokenizer = tiny
    completion, _ = run_episode(tiny, [call("crop_grid", bbox_2d=[0, 0, 2, 2]), "x"], max_context_tokens=40)
    assert completion.info["ended_by"] == "context"
    assert "<tool_response>" not in completion.text


def test_decode_stops_at_a_stop_text(tiny) -> None:
    model, tokenizer = tiny
    engine = CachedEngine(model, tokenizer)
    prompt = tokenizer("Once upon a time", add_special_tokens=False).input_ids
    greedy = SamplingParams(1, 12, 0.0)
    (full,) = engine.decode([prompt], greedy)
    stop = tokenizer.decode(full.tokens[4:6])
    (cut,) = engine.decode([prompt], greedy, stop_text=stop)
    assert cut.ended_by == "stop"
    assert cut.tokens == full.tokens[: len(cut.tokens)]
    assert stop in tokenizer.decode(cut.tokens) and stop not in tokenizer.decode(cut.tokens[:-1])
    (short,) = engine.decode([prompt], greedy, limits=[3])
    assert short.tokens == full.tokens[:3] and short.ended_by == "length"


def completion(text: str, group: int, **info: object) -> Completion:
    return Completion(group, EXAMPLE, "p", [1], [2], text, info=dict(info))


def test_tool_verifier_zeroes_a_correct_answer_after_an_unrepaired_error() -> None:
    batch = RolloutBatch(
        [
            completion("<answer>6</answer>", 0, final_tool_error=True, tool_executed=1),
            completion("<answer>6</answer>", 0, final_tool_error=False, tool_executed=1),
            completion("<answer>7</answer>", 0, final_tool_error=True, tool_executed=1),
            completion("<answer>6</answer>", 0),
        ]
    )
    result = ToolAwareVerifier()(batch, RewardContext(None, TagFormat()))
    assert result.scores == [0.0, 1.0, 0.0, 1.0]
    assert "never repaired" in str(result.reasons[0])
    assert result.extras["correct_with_tool"][:3] == [0.0, 1.0, 0.0]
    assert (
        math.isnan(result.extras["correct_with_tool"][3]) and result.extras["correct_without_tool"][3] == 1.0
    )


def test_curiosity_counts_executed_calls_from_the_engine() -> None:
    calls = [0, 0, 1, 3, 0, 0, 0, 0]  # spec §12: RaPR 0.25
    batch = RolloutBatch([completion("no tags here", 0, tool_executed=n) for n in calls])
    result = CuriosityBonus()(batch, RewardContext(None, TagFormat()))
    assert result.extras["rapr"] == [0.25] * 8
    assert result.scores == pytest.approx([0, 0, 0.025, 0.025 - 0.1, 0, 0, 0, 0])


def test_curiosity_does_not_penalise_the_refused_fifth_call(tiny) -> None:
    episode, _ = run_episode(tiny, [call("crop_grid", bbox_2d=[0, 0, 2, 2])] * 5)
    assert (episode.info["tool_calls"], episode.info["tool_executed"]) == (5, 4)
    batch = RolloutBatch([episode] + [completion("no call", 7) for _ in range(7)])
    result = CuriosityBonus()(batch, RewardContext(None, TagFormat()))
    # RaPR 1/8: bonus 0.5·(0.3 − 0.125) = 0.0875; 4 executed calls cost 0.05·(4 − 1)
    assert result.scores[0] == pytest.approx(0.0875 - 0.15)
    assert result.extras["tool_calls"][0] == 4.0


def test_sft_encoder_masks_observations_exactly_where_the_engine_puts_them(tiny) -> None:
    _, tokenizer = tiny
    obs = PROTOCOL.response("Here is the cropped grid (rows 1-2, columns 1-2):\nrow 1: 0 1")
    target = (
        "<think>\n"
        + call("crop_grid", bbox_2d=[0, 0, 1, 1])
        + obs
        + "It is 0.\n</think>\n<answer>\n0\n</answer>"
    )
    ids, mask = ObservationMaskingEncoder(tokenizer, PROTOCOL)(target)
    obs_ids = tokenizer(obs, add_special_tokens=False).input_ids
    start = mask.index(0.0)
    assert ids[start : start + len(obs_ids)] == obs_ids
    assert mask.count(0.0) == len(obs_ids)
    assert ids[-1] == tokenizer.eos_token_id and mask[-1] == 1.0


def test_grid_task_traces_replay_through_the_tools() -> None:
    rows = make_rows(32, seed=3)
    assert make_rows(32, seed=3) == rows
    with_tool = [r for r in rows if "<tool_call>" in r["reasoning"]]
    assert 0 < len(with_tool) < len(rows)
    for row in with_tool:
        example = Example(prompt=row["prompt"], reference=row["reference"], metadata={"grid": row["grid"]})
        pieces = PROTOCOL.split_responses(row["reasoning"])
        text = ""
        for piece, is_observation in pieces:
            if is_observation:
                expected, _ = observe({"crop_grid": CropGrid()}, text, PROTOCOL, example)
                assert piece == PROTOCOL.response(expected)
            text += piece
        r, c = (
            int(x) for x in row["prompt"].split("What digit is at row ")[1].split("?")[0].split(", column ")
        )
        assert row["reference"] == row["grid"][r - 1][c - 1]
        assert row["reasoning"].endswith(f"is {row['reference']}.")


@pytest.mark.parametrize(("name", "count", "seed"), [("grid-zoom", 64, 0), ("grid-zoom-eval", 48, 1)])
def test_shipped_data_is_the_generator_output(name: str, count: int, seed: int) -> None:
    shipped = Path(__file__).parents[1] / "recipes" / "data" / f"{name}.jsonl"
    assert [json.loads(x) for x in shipped.read_text().splitlines()] == make_rows(count, seed)


def test_tools_need_the_cached_engine_and_known_names(tmp_path: Path) -> None:
    from incentive.config import ConfigError, load_recipe
    from incentive.run import Run

    recipe = Path(__file__).parents[1] / "recipes" / "pixel-reasoner.yaml"
    base = ["model.name=tiny-random", "sft.steps=0", "eval.data=null"]
    with pytest.raises(ConfigError, match="tools need generation.engine: cached"):
        Run(load_recipe(recipe, [*base, "generation.engine=hf"]), tmp_path / "a")
    with pytest.raises(ConfigError, match="unknown tool 'zoom'; known: crop_grid, select_frames"):
        Run(load_recipe(recipe, [*base, "tools.tools=[{name: zoom}]"]), tmp_path / "b")
    with pytest.raises(ConfigError, match="tool 'crop_grid'.*unexpected keyword"):
        Run(load_recipe(recipe, [*base, "tools.tools=[{name: crop_grid, args: {zoom: 2}}]"]), tmp_path / "c")
    assert not (tmp_path / "a").exists()
