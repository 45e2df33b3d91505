"""The classic (no-weights) engine: continuity on synthetic motion, honesty about direction, "None", contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from tpru_agent.engines import create_engine
from tpru_agent.engines.base import Engine, Request
from tpru_agent.engines.classic import IMPOSSIBLE, ClassicEngine
from tpru_agent.errors import ConfigError
from tpru_agent.tasks import continuation, format_score, next_frame, ordering, parse_response, previous


def square(x: int, y: int = 40, colour=(220, 60, 60), size: int = 24) -> Image.Image:
    """A coloured square at (x, y) on a dark 128x128 background."""
    a = np.full((128, 128, 3), 30, np.uint8)
    a[y:y + size, x:x + size] = colour
    return Image.fromarray(a)


#: A square moving left to right: step k of the procedure is MOVING[k].
MOVING = [square(x) for x in (8, 36, 64, 92)]
#: Frames that continue nothing: other colours, other places.
FAR = [square(20, 100, (20, 200, 20)), square(90, 100, (20, 20, 200)), square(50, 2, (200, 200, 20)),
       square(60, 100, (200, 20, 200))]


def probs(engine: ClassicEngine, question, images) -> dict[str, float]:
    answers = question.answers()
    scores = engine.score(Request(question, question.problem, tuple(images)), [continuation(a) for a in answers])
    return {a: math.exp(s) for a, s in zip(answers, scores)}


@pytest.fixture(scope="module")
def engine() -> ClassicEngine:
    return ClassicEngine()


def test_is_an_engine_built_by_name():
    engine = create_engine("classic", None)
    assert isinstance(engine, Engine) and engine.name == "classic"


@pytest.mark.parametrize("shown", [(2, 0, 3, 1), (3, 2, 1, 0), (1, 3, 0, 2), (0, 1, 2, 3)])
def test_ordering_recovers_the_path_up_to_direction(engine, shown):
    q = ordering.build(4)
    truth = "".join(q.labels[shown.index(step)] for step in range(4))   # label of step 0, 1, 2, 3
    p = probs(engine, q, [MOVING[s] for s in shown])
    best = max(p, key=p.get)
    assert best in (truth, truth[::-1])
    # honest about direction: the reverse is exactly as likely, and together they dominate
    assert p[truth] == pytest.approx(p[truth[::-1]], abs=1e-9)
    others = [v for k, v in p.items() if k not in (truth, truth[::-1])]
    assert max(others) < 0.7 * p[truth]
    assert p[truth] + p[truth[::-1]] > 3 * (2 / 24)          # the pair is well above chance
    assert sum(p.values()) == pytest.approx(1.0, abs=1e-9)


def test_generate_answers_in_the_trained_format_and_says_direction_is_unknown(engine):
    q = ordering.build(4)
    raw = engine.generate([Request(q, q.problem, tuple(MOVING[s] for s in (2, 0, 3, 1)))])[0]
    assert format_score(raw) == 0.2
    parsed = parse_response(raw, q.validate)
    assert parsed.answer in ("BDAC", "CADB")
    assert "reverse" in parsed.think and "not checked" in parsed.think


@pytest.mark.parametrize("none_position", [-1, 0, 2])
def test_next_frame_picks_the_continuation(engine, none_position):
    q = next_frame.build(2, 4, with_goal=True, none_position=none_position)   # steps 1, 2 and goal 4 given
    cands = [FAR[0], MOVING[2], FAR[2], MOVING[0]]                              # the true step 3 is candidate 1
    p = probs(engine, q, [MOVING[0], MOVING[1], MOVING[3]] + cands)
    best = max(p, key=p.get)
    assert q.option(best).value == 1
    raw = engine.generate([Request(q, q.problem, tuple([MOVING[0], MOVING[1], MOVING[3]] + cands))])[0]
    assert parse_response(raw, q.validate).answer == best


def test_next_frame_without_goal_and_previous_frame(engine):
    q = next_frame.build(2, 3)                                   # steps 1, 2 given, which is step 3?
    p = probs(engine, q, [MOVING[0], MOVING[1], FAR[1], MOVING[2], MOVING[0]])
    assert q.option(max(p, key=p.get)).value == 1
    q = previous.build(3, 4)                                     # steps 2, 3, 4 given, which is step 1?
    p = probs(engine, q, MOVING[1:] + [FAR[3], FAR[0], MOVING[0], MOVING[3]])
    assert q.option(max(p, key=p.get)).value == 2


def test_none_is_chosen_when_every_candidate_is_far(engine):
    q = next_frame.build(2, 4, with_goal=True, none_position=1)
    p = probs(engine, q, [MOVING[0], MOVING[1], MOVING[3]] + FAR)
    assert max(p, key=p.get) == q.none_letter == "B"
    assert p["B"] > 0.8


def test_ordering_mcq_prefers_the_shortest_path_and_none_when_no_option_is_close(engine):
    shown = [MOVING[s] for s in (2, 0, 3, 1)]                 # truth BDAC
    q = ordering.build_mcq(4, ["ABCD", "BDAC", "DCBA", "CBAD"], none_position=-1)
    p = probs(engine, q, shown)
    assert max(p, key=p.get) == "B"
    q = ordering.build_mcq(4, ["ABCD", "DCBA", "ADCB", "BCDA"], none_position=0)
    p = probs(engine, q, shown)
    assert max(p, key=p.get) == q.none_letter


def test_scores_are_log_probabilities_over_the_answer_space(engine):
    q = ordering.build(3)
    request = Request(q, q.problem, tuple(MOVING[:3]))
    full = engine.score(request, [continuation(a) for a in q.answers()])
    assert sum(math.exp(s) for s in full) == pytest.approx(1.0)
    # a continuation's score does not depend on which others are asked; invalid answers are impossible
    some = engine.score(request, [continuation("CBA"), continuation("AAB"), "no answer here"])
    assert some[0] == pytest.approx(full[q.answers().index("CBA")])
    assert some[1:] == [IMPOSSIBLE, IMPOSSIBLE]


def test_identical_frames_give_no_preference(engine):
    q = ordering.build(4)
    p = probs(engine, q, [MOVING[0]] * 4)
    assert max(p.values()) == pytest.approx(1 / 24)


@pytest.mark.parametrize("bad, match", [
    ({"nope": 1}, "unknown classic engine option"),
    ({"order_temperature": 0}, "must be > 0"),
    ({"choice_temperature": -1.0}, "must be > 0"),
    ({"grid_sizes": (32, 0)}, "grid_sizes"),
    ({"grid_sizes": ()}, "grid_sizes"),
])
def test_bad_options_fail_with_the_valid_ones(bad, match):
    with pytest.raises(ConfigError, match=match):
        ClassicEngine(**bad)


def test_image_count_must_match_the_question(engine):
    q = ordering.build(4)
    with pytest.raises(ConfigError, match="shows 4 images"):
        engine.score(Request(q, q.problem, tuple(MOVING[:3])), [continuation("ABCD")])


def test_examples_frames_are_ordered_up_to_direction(engine):
    """The README's frames (a real Meta-World episode, shuffled): the path is found, direction is a coin."""
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples" / "frames"
    truth = json.loads((folder / "order.json").read_text())["order"]
    q = ordering.build(4)
    names = sorted(p.name for p in folder.glob("*.png"))
    images = [Image.open(folder / n).convert("RGB") for n in names]
    answer = "".join(q.labels[names.index(n)] for n in truth)
    p = probs(engine, q, images)
    assert max(p, key=p.get) in (answer, answer[::-1])


def test_one_context_frame_prefers_the_closest_new_frame(engine):
    q = next_frame.build(1, 4)                                   # only step 1 given, which is step 2?
    p = probs(engine, q, [MOVING[0], FAR[0], MOVING[3], MOVING[1], FAR[2]])
    assert q.option(max(p, key=p.get)).value == 2


# ------------------------------------------------------------------ issue 14: no echo, honest direction, contract
def _episode(n: int, seed: int = 0):
    from episode_data import frame, palette

    colour = palette(3, seed=seed)[seed % 3]
    return [frame(colour, i, n) for i in range(n)]


@pytest.mark.parametrize("n, seed", [(5, 0), (8, 1), (8, 2), (12, 3), (16, 4)])
def test_more_than_four_shuffled_frames_are_ordered_not_echoed(n, seed):
    """Each window's pairwise preferences were all 0.5, so more than 4 frames came back in input order."""
    import random

    from tpru_agent import TPRU

    steps = list(range(n))
    random.Random(seed).shuffle(steps)
    frames = _episode(n, seed)
    result = TPRU("classic").order_frames([frames[s] for s in steps], mode="reason")
    got = [steps[i] for i in result.order]
    assert got in (sorted(steps), sorted(steps)[::-1])         # the path, in one direction or the other
    assert list(result.order) != list(range(n))                 # not the input echoed
    assert result.order[0] < result.order[-1]                   # the tie broken by the stated rule
    assert not result.direction_known and 0.0 < result.confidence <= 0.5
    assert "guess" in result.raw
    assert result.mode == "fast" and "generate_s" not in result.timings  # what ran: no generation (issue 14)


def test_four_frames_report_the_direction_guess_and_what_ran():
    from tpru_agent import TPRU

    result = TPRU("classic").order_frames([MOVING[s] for s in (2, 0, 3, 1)], mode="reason")
    assert result.answer in ("BDAC", "CADB") and not result.direction_known
    assert result.probabilities[result.answer] == pytest.approx(result.probabilities[result.answer[::-1]])
    assert result.mode == "fast" and set(result.timings) >= {"score_s"} and "generate_s" not in result.timings


def test_order_method_handles_many_frames_and_a_direction_free_confidence(engine):
    frames = _episode(24)
    result = engine.order(frames[::-1])
    assert result.order in (tuple(range(24)), tuple(range(23, -1, -1)))
    assert result.order[0] == 0 and result.confidence <= 0.5 and result.length > 0
    with pytest.raises(ConfigError, match="at least 2"):
        engine.order(frames[:1])


def test_duplicate_continuations_are_refused_like_every_engine(engine):
    q = ordering.build(3)
    request = Request(q, q.problem, tuple(MOVING[:3]))
    with pytest.raises(ConfigError, match="distinct"):
        engine.score(request, [continuation("ABC"), continuation("ABC")])
    assert engine.score(request, []) == []


def test_a_closed_engine_raises_a_typed_error():
    from tpru_agent import TPRU
    from tpru_agent.errors import EngineClosedError

    model = TPRU("classic")
    q = ordering.build(3)
    request = Request(q, q.problem, tuple(MOVING[:3]))
    model.close()
    with pytest.raises(EngineClosedError, match="closed"):
        model.engine.score(request, [continuation("ABC")])
    with pytest.raises(EngineClosedError):
        model.engine.generate([request])
    with pytest.raises(EngineClosedError):
        model.order_frames(MOVING[:3], mode="fast")
    with pytest.raises(EngineClosedError):
        model.order_frames(_episode(6), mode="fast")


def test_a_step_backwards_is_not_a_valid_next_step():
    """The README's Meta-World episode: after steps 2, 3 the classic engine accepted step 1 at P(ok) 0.79."""
    import json
    from pathlib import Path

    from tpru_agent import TPRU

    folder = Path(__file__).resolve().parents[1] / "examples" / "frames"
    truth = json.loads((folder / "order.json").read_text())["order"]
    steps = [Image.open(folder / name).convert("RGB") for name in truth]
    model = TPRU("classic")
    back = model.verify_step(steps[1:3], steps[0], mode="fast")
    assert not back.ok and back.confidence < 0.5
    forward = model.verify_step(steps[1:3], steps[3], mode="fast")
    assert forward.ok and forward.confidence > 0.5
    episode = _episode(8)
    for k in (2, 3, 4):
        assert not model.verify_step(episode[k:k + 2], episode[k - 1], mode="fast").ok
        assert model.verify_step(episode[k:k + 2], episode[k + 2], mode="fast").ok


def test_the_same_frame_again_is_no_progress():
    """It was "valid next step, P(ok) = 0.500": a tie counted as ok."""
    from tpru_agent import TPRU

    verdict = TPRU("classic").verify_step(MOVING[:2], MOVING[1], mode="reason")
    assert not verdict.ok and verdict.duplicate
    assert verdict.mode == "fast" and "generate_s" not in verdict.timings


def test_results_name_the_classic_engine_not_a_model_that_did_not_run(frames4):
    from tpru_agent import TPRU

    model = TPRU(engine="classic")  # the default model name, but no weights run
    result = model.order_frames(frames4, mode="fast")
    assert model.model_name == "classic" and result.settings["model"] == "classic"
    assert model.info()["model"] == "classic"
