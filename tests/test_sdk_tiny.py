"""The facade end to end on the real Qwen2.5-VL class (tiny random checkpoint built offline): every task call."""

from __future__ import annotations

import math
import sys

import pytest

from tpru_agent import TPRU, ModelNotFoundError, ParseError
from tpru_agent.engines.base import Request
from tpru_agent.model import softmax
from tpru_agent.tasks import continuation, ordering, render_prompt


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    with TPRU(tiny_checkpoint, max_new_tokens=24) as m:
        yield m


def test_loads_through_the_real_path(model, tiny_checkpoint):
    assert model.engine_name == "hf"
    info = model.info()
    assert info["engine"] == "hf" and info["parameters"] > 100_000
    assert "torch" in sys.modules


def test_order_fast_equals_the_engine_scores(model, frames4):
    result = model.order_frames(frames4[::-1], mode="fast")
    assert sorted(result.order) == [0, 1, 2, 3]
    assert len(result.probabilities) == 24
    assert sum(result.probabilities.values()) == pytest.approx(1.0)
    assert result.confidence == pytest.approx(max(result.probabilities.values()))
    # the same numbers straight from the engine
    q = ordering.build(4)
    request = Request(q, render_prompt(q.problem), tuple(frames4[::-1]))
    scores = model.engine.score(request, [continuation(a) for a in q.answers()])
    direct = softmax(dict(zip(q.answers(), scores)))
    best = max(direct, key=direct.get)
    assert result.answer == best
    assert result.probabilities[best] == pytest.approx(direct[best], rel=1e-5)


def test_reason_mode_keeps_raw_text_on_parse_failure(model, frames4):
    raw = model.engine.generate([Request(ordering.build(4), render_prompt(ordering.build(4).problem),
                                         tuple(frames4))], model.options)[0]
    try:
        result = model.order_frames(frames4, mode="reason")
    except ParseError as exc:  # a random model rarely writes a valid answer
        assert exc.raw == raw
    else:
        assert result.raw == raw and 0.0 <= result.confidence <= 1.0


def test_choice_calls(model, frames4):
    nxt = model.predict_next(frames4[:2], frames4[2:] + frames4[:1], goal=frames4[3], mode="fast")
    assert nxt.index in (0, 1, 2, None)
    assert set(nxt.options) == {"A", "B", "C", "D"} and nxt.options["D"] is None
    assert sum(nxt.probabilities.values()) == pytest.approx(1.0)
    prev = model.review_previous(frames4[1:], frames4[:2], mode="fast", none_position=0)
    assert prev.options["A"] is None and prev.options["B"] == 0
    verdict = model.verify_step(frames4[:2], frames4[2], mode="fast")
    assert verdict.ok == (verdict.choice.index == 0 and verdict.confidence > 0.5)  # one candidate + "None"
    assert not verdict.lenient and not verdict.duplicate and not nxt.lenient
    again = model.verify_step(frames4[:2], frames4[1], mode="fast")  # the last history frame again: no progress
    assert again.duplicate and not again.ok
    assert math.isclose(verdict.confidence, verdict.choice.probabilities["A"])


def test_many_frames_use_windows(model, frames4):
    frames = frames4 + [f.rotate(180) for f in frames4[:2]]
    result = model.order_frames(frames, mode="fast")
    assert sorted(result.order) == list(range(6))
    assert len(result.windows) >= 3 and 0.0 < result.confidence <= 1.0


def test_offline_hub_name_gives_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        TPRU("tpru-3b")
    text = str(info.value)
    assert "Stephengzk/TPRU-3B" in text and str(tmp_path) in text and "classic" in text


def test_debias_means_and_costs_the_same_through_ask_and_predict_next(model, frames4):
    """``tpru eval run --debias 2`` (TPRU.ask) and ``tpru next --debias 2`` (predict_next) make the same passes."""
    from tpru_agent.tasks import next_frame

    hist, goal, cands = frames4[:2], frames4[3], [frames4[2], frames4[0], frames4[1].rotate(90), frames4[3]]
    debiased = TPRU(engine=model.engine, debias=2)
    via_next = debiased.predict_next(hist, cands, goal=goal, mode="fast")
    question = next_frame.build(2, 4, with_goal=True)
    via_ask = TPRU(engine=model.engine).ask(question, [*hist, goal, *cands], mode="fast", debias=2)
    assert via_next.probabilities == pytest.approx(via_ask.probabilities, abs=1e-6)
    assert via_next.letter == via_ask.answer
    # 2 cyclic shifts of the 4 candidates, each with the None option last and first: 4 scoring passes either way
    assert via_next.timings["calls"] == via_ask.timings["calls"] == 4
    plain = TPRU(engine=model.engine).ask(question, [*hist, goal, *cands], mode="fast")
    assert plain.timings["calls"] == 1 and plain.probabilities != pytest.approx(via_ask.probabilities, abs=1e-6)


def test_results_record_their_settings_and_token_usage(model, frames4):
    fresh = [f.rotate(90, expand=True) for f in frames4]  # frames this engine's prefix cache has not seen
    first = model.order_frames(fresh, mode="fast")
    assert first.settings["mode"] == "fast" and first.settings["engine"] == "hf"
    assert first.settings["max_new_tokens"] == 24 and first.settings["debias"] == 1
    assert first.settings["budget"] == {"min_pixels": model.budget.min_pixels, "max_pixels": model.budget.max_pixels,
                                        "factor": model.budget.factor}
    assert first.usage["image_tokens"] > 0 and first.usage["prompt_tokens"] > first.usage["image_tokens"]
    assert first.usage["generated_tokens"] == 0  # fast mode only scores
    again = model.order_frames(fresh, mode="fast")  # the prefix cache holds the prompt: only the answers run
    assert again.usage["image_tokens"] == 0 and 0 < again.usage["prompt_tokens"] < first.usage["prompt_tokens"]
    assert again.probabilities == pytest.approx(first.probabilities, abs=1e-5)
    step = model.verify_step(fresh[:2], fresh[2], mode="fast")
    assert step.usage == step.choice.usage and step.usage["prompt_tokens"] > 0
    assert {"settings", "usage"} <= set(step.to_dict())
    # reason mode over windows (an unparsable window is scored instead): each window generated its tokens
    reasoned = model.order_frames([*fresh, fresh[0].rotate(180)], mode="reason")
    assert reasoned.settings["mode"] == "reason"
    assert len(reasoned.windows) <= reasoned.usage["generated_tokens"] <= 24 * len(reasoned.windows)
