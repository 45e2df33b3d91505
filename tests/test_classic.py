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
