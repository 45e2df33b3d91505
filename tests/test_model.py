"""The facade's logic (question building, answer mapping, windows, debiasing, errors) over a pixel-reading engine.

``PixelOracle`` implements the engine protocol by reading the step number painted into each frame, so the facade's
mapping from letters and labels back to the caller's frames is checked against a known truth. The real
Qwen2.5-VL path runs in tests/test_sdk_tiny.py.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from oracle import PixelOracle, frame

from tpru_agent import TPRU, ConfigError, FrameError, ParseError


@pytest.mark.parametrize("mode", ["fast", "reason"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_order_small(mode, n):
    steps = list(range(1, n + 1))
    random.Random(n).shuffle(steps)
    engine = PixelOracle()
    result = TPRU(engine=engine).order_frames([frame(s) for s in steps], mode=mode)
    assert [steps[i] for i in result.order] == sorted(steps)
    assert result.confidence == pytest.approx(1 / (1 + (len(list(itertools.permutations(steps))) - 1) * np.exp(-4)))
    assert result.engine == "oracle" and result.mode == mode
    assert set(result.timings) >= {"prepare_s", "score_s", "total_s"}
    assert engine.generate_calls == (1 if mode == "reason" else 0)
    if mode == "reason":
        assert engine.prefixes[-1] == "<think>steps read from pixels</think>"


@pytest.mark.parametrize("n", [5, 9, 16])
def test_order_many_frames_through_windows(n):
    steps = list(range(1, n + 1))
    random.Random(7).shuffle(steps)
    engine = PixelOracle()
    result = TPRU(engine=engine).order_frames([frame(s) for s in steps], mode="fast")
    assert [steps[i] for i in result.order] == sorted(steps)
    assert len(result.windows) == engine.score_calls
    assert all(w["agrees"] for w in result.windows)
    # every window gives the final order its own probability 1 / (1 + 23 e^-4): the geometric mean is that
    assert result.confidence == pytest.approx(1 / (1 + 23 * np.exp(-4)))


@pytest.mark.parametrize("mode", ["fast", "reason"])
@pytest.mark.parametrize("none_position", [0, 2, -1])
def test_predict_next_maps_letters_back(mode, none_position):
    engine = PixelOracle()
    model = TPRU(engine=engine)
    result = model.predict_next([frame(1), frame(2)], [frame(9), frame(3), frame(7), frame(8)], goal=frame(4),
                                mode=mode, none_position=none_position)
    assert result.index == 1
    assert result.options[result.letter] == 1
    assert sum(result.probabilities.values()) == pytest.approx(1.0)
    assert result.confidence == max(result.probabilities.values())


def test_predict_next_none_when_no_candidate_fits():
    result = TPRU(engine=PixelOracle()).predict_next([frame(1), frame(2)], [frame(9), frame(8)], mode="fast")
    assert result.index is None
    assert result.options[result.letter] is None


def test_review_previous():
    result = TPRU(engine=PixelOracle()).review_previous([frame(4), frame(5), frame(6)],
                                                        [frame(1), frame(9), frame(3)], mode="fast")
    assert result.index == 2


def test_verify_step_ok_and_not_ok():
    model = TPRU(engine=PixelOracle())
    good = model.verify_step([frame(1), frame(2)], frame(3), mode="fast")
    bad = model.verify_step([frame(1), frame(2)], frame(6), mode="fast")
    assert good.ok and good.confidence > 0.9
    assert not bad.ok and bad.confidence < 0.1
    assert good.choice.options["A"] == 0 and good.choice.options["B"] is None
    assert set(good.to_dict()) >= {"ok", "confidence", "choice", "raw", "engine", "mode", "timings"}


def test_debias_averages_over_shifts_and_keeps_the_answer():
    engine = PixelOracle()
    model = TPRU(engine=engine, debias=3)
    result = model.predict_next([frame(1), frame(2)], [frame(9), frame(3), frame(7), frame(8)], mode="fast")
    assert result.index == 1
    assert engine.score_calls == 3 * 2  # 3 cyclic shifts, with the "None" option last and then first
    assert result.timings["calls"] == engine.score_calls == 6  # the record tells the passes made
    verdict = model.verify_step([frame(1), frame(2)], frame(3), mode="fast")
    assert verdict.ok and engine.score_calls == 6 + 2  # one candidate: only the "None" letter can move
    assert verdict.timings["calls"] == 2
    with pytest.raises(ConfigError, match="debias"):
        TPRU(engine=engine, debias=0)


def test_reason_mode_parse_error_keeps_raw():
    model = TPRU(engine=PixelOracle(reply="<think>hmm</think><answer>ZZZZ</answer>"))
    with pytest.raises(ParseError) as info:
        model.order_frames([frame(1), frame(2), frame(3), frame(4)], mode="reason")
    assert "ZZZZ" in info.value.raw


def test_bad_inputs_are_typed():
    model = TPRU(engine=PixelOracle())
    with pytest.raises(FrameError, match="frames"):
        model.order_frames([frame(1)])
    with pytest.raises(FrameError):
        model.order_frames([frame(1)] * 65)
    with pytest.raises(FrameError):
        model.predict_next([frame(1)], [frame(2)] * 9)
    with pytest.raises(ConfigError, match="mode"):
        model.order_frames([frame(1), frame(2)], mode="slow")
    with pytest.raises(FrameError):
        model.verify_step([frame(1)], "/no/such/file.png")


def test_template_is_checked_at_construction(tmp_path):
    with pytest.raises(ConfigError):
        TPRU(engine=PixelOracle(), template=tmp_path / "nope.jinja")


def test_result_to_dict_is_json_ready():
    import json

    result = TPRU(engine=PixelOracle()).order_frames([frame(2), frame(1)], mode="fast")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["order"] == [1, 0] and data["answer"] == "BA"


def test_engine_object_is_checked():
    with pytest.raises(ConfigError, match="generate"):
        TPRU(engine=42)
    assert "oracle" in TPRU(engine=PixelOracle()).model_name


def test_bgr_arrays_are_converted():
    import numpy as np

    rgb = np.asarray(frame(3))
    engine = PixelOracle()
    result = TPRU(engine=engine, bgr=True).predict_next([np.asarray(frame(1))[..., ::-1],
                                                        np.asarray(frame(2))[..., ::-1]],
                                                       [rgb[..., ::-1], np.asarray(frame(7))[..., ::-1]], mode="fast")
    assert result.index == 0  # painted steps survived the BGR -> RGB conversion


def test_an_unparsable_window_falls_back_to_its_scores():
    engine = PixelOracle(reply="<think>no answer here</think>")
    steps = [3, 1, 5, 2, 4, 6]
    result = TPRU(engine=engine).order_frames([frame(s) for s in steps], mode="reason")
    assert [steps[i] for i in result.order] == sorted(steps)
    assert engine.generate_calls == len(result.windows)
    assert all(w["scored_after_parse_error"] for w in result.windows)


# ------------------------------------------------------------------ issue 14: no silent wrong answers
class Tied(PixelOracle):
    """Gives every continuation the same score: every option equally likely."""

    def score(self, request, continuations, *, prefix=""):
        self.score_calls += 1
        return [0.0] * len(continuations)


def test_a_tie_is_not_ok():
    verdict = TPRU(engine=Tied()).verify_step([frame(1), frame(2)], frame(3), mode="fast")
    assert verdict.confidence == pytest.approx(0.5) and not verdict.ok


def test_the_last_history_frame_again_is_no_progress():
    verdict = TPRU(engine=PixelOracle()).verify_step([frame(1), frame(2)], frame(2), mode="fast")
    assert verdict.duplicate and not verdict.ok
    assert not TPRU(engine=PixelOracle()).verify_step([frame(1), frame(2)], frame(3), mode="fast").duplicate


@pytest.mark.parametrize("answer", ["A or B", "A/B", "A B", "A. Actually B"])
def test_verify_step_refuses_an_answer_naming_several_options(answer):
    """With such output verify_step said ok=True at P(ok) = 0.0067."""
    model = TPRU(engine=PixelOracle(reply=f"<think>x</think><answer>{answer}</answer>"))
    with pytest.raises(ParseError, match="more than one option"):
        model.verify_step([frame(1), frame(2)], frame(3), distractors=[frame(7)], mode="reason")


@pytest.mark.parametrize("reply, lenient", [
    ("<think>x</think><answer>A</answer>", False),
    ("<think>x</think><answer>(A)</answer>", True),
    ("<think>so <answer>B</answer></think><answer>A</answer>", True),
    ("A", True),
])
def test_a_lenient_parse_is_flagged_on_every_result(reply, lenient):
    model = TPRU(engine=PixelOracle(reply=reply))
    verdict = model.verify_step([frame(1), frame(2)], frame(3), mode="reason")
    assert verdict.ok and verdict.lenient is lenient and verdict.choice.lenient is lenient
    choice = model.predict_next([frame(1), frame(2)], [frame(3), frame(8)], mode="reason")
    assert choice.index == 0 and choice.lenient is lenient
    assert model.verify_step([frame(1), frame(2)], frame(3), mode="fast").lenient is False


def test_a_lenient_ordering_is_flagged_single_and_windowed():
    model = TPRU(engine=PixelOracle(reply="<think>x</think><answer>A, B, C, D</answer>"))
    assert model.order_frames([frame(s) for s in (1, 2, 3, 4)], mode="reason").lenient
    assert model.order_frames([frame(s) for s in (1, 2, 3, 4, 5)], mode="reason").lenient
    strict = TPRU(engine=PixelOracle()).order_frames([frame(s) for s in (2, 1, 3, 4, 5)], mode="reason")
    assert not strict.lenient and strict.direction_known


def test_a_direction_blind_engine_is_reported_as_a_guess():
    result = TPRU(engine=Tied()).order_frames([frame(s) for s in (2, 1, 3)], mode="fast")
    assert not result.direction_known
    assert TPRU(engine=PixelOracle()).order_frames([frame(s) for s in (2, 1, 3)], mode="fast").direction_known


def test_debias_passes_are_one_rule_for_every_question():
    from tpru_agent.asking import moved_none, passes
    from tpru_agent.tasks import next_frame, ordering, previous

    assert passes(next_frame.build(2, 4, with_goal=True), "fast", 3) == 6  # 3 shifts x None last and first
    assert passes(next_frame.build(2, 4, none_position=None), "fast", 3) == 3  # no None option to move
    assert passes(previous.build(3, 2), "fast", 8) == 4  # at most one shift per candidate
    assert passes(next_frame.build(2, 4), "reason", 3) == passes(next_frame.build(2, 4), "fast", 1) == 1
    assert passes(ordering.build(4), "fast", 4) == 1
    mcq = ordering.build_mcq(4, ["ABCD", "DCBA"])  # options are permutations, not candidate images
    assert moved_none(mcq) is None and passes(mcq, "fast", 2) == 1


def test_ask_and_predict_next_agree_under_debias():
    from tpru_agent.tasks import next_frame

    engine = PixelOracle()
    hist, cands = [frame(1), frame(2)], [frame(9), frame(3), frame(7)]
    result = TPRU(engine=engine, debias=3).predict_next(hist, cands, mode="fast")
    ans = TPRU(engine=engine).ask(next_frame.build(2, 3), hist + cands, mode="fast", debias=3)
    assert result.probabilities == pytest.approx(ans.probabilities) and result.letter == ans.answer
    assert result.timings["calls"] == ans.timings["calls"] == 6 and engine.score_calls == 12
    assert result.settings["debias"] == 3 and result.usage == {"prompt_tokens": 0, "image_tokens": 0,
                                                               "generated_tokens": 0}


@pytest.mark.parametrize("budget", ["small", (16384, 36864), 36864])
def test_a_budget_that_is_not_a_pixel_budget_is_refused_by_name(budget):
    with pytest.raises(ConfigError, match="budget must be a tpru_agent.sizing.PixelBudget"):
        TPRU("classic", budget=budget)
