"""ProcedureChecker: verdicts, hysteresis, duplicates, reference progress, log and summary."""

from __future__ import annotations

import json

import pytest
from oracle import PixelOracle, frame

from tpru_agent import TPRU, ConfigError, ProcedureChecker, Status


def make(**kwargs):
    engine = PixelOracle()
    return ProcedureChecker(TPRU(engine=engine), **kwargs), engine


def test_correct_procedure_is_accepted_step_by_step():
    checker, engine = make(window=2)
    events = [checker.observe(frame(s)) for s in range(1, 7)]
    assert [e.status for e in events] == [Status.ACCEPTED] * 6
    assert events[0].details["reason"].startswith("first frame")
    assert all(e.confidence > 0.9 for e in events[1:])
    assert engine.score_calls == 5
    assert len(checker.history) == 6


def test_wrong_step_needs_confirmation_then_rejects():
    checker, _ = make(confirm=2)
    statuses = [checker.observe(frame(s)).status for s in (1, 2, 3, 7, 8)]
    assert statuses == [Status.ACCEPTED, Status.ACCEPTED, Status.ACCEPTED, Status.UNCERTAIN, Status.REJECTED]
    summary = checker.summary()
    assert summary["first_rejected_step"] == 4 and summary["first_doubt_step"] == 3
    assert summary["counts"] == {"accepted": 3, "rejected": 1, "uncertain": 1}
    assert len(checker.history) == 3  # rejected frames never join the history


def test_single_glitch_does_not_flip_and_recovery_continues():
    checker, _ = make(confirm=2)
    statuses = [checker.observe(frame(s)).status for s in (1, 2, 9, 3, 4)]
    assert statuses == [Status.ACCEPTED, Status.ACCEPTED, Status.UNCERTAIN, Status.ACCEPTED, Status.ACCEPTED]


def test_duplicates_skip_the_model():
    checker, engine = make()
    checker.observe(frame(1))
    checker.observe(frame(2))
    calls = engine.score_calls
    dup = checker.observe(frame(2))
    assert dup.duplicate and dup.status == Status.ACCEPTED and engine.score_calls == calls
    assert checker.summary()["duplicates"] == 1


def test_reference_gives_progress_and_goal():
    reference = [frame(s) for s in range(1, 6)]
    checker, _ = make(reference=reference, window=2)
    events = [checker.observe(frame(s)) for s in range(1, 6)]
    assert [e.matched_step for e in events] == [0, 1, 2, 3, 4]
    assert events[-1].progress == pytest.approx(1.0)
    assert all(e.status == Status.ACCEPTED for e in events)


def test_reset_and_log(tmp_path):
    log = tmp_path / "events.jsonl"
    checker, _ = make(log_path=log)
    for s in (1, 2, 5):
        checker.observe(frame(s))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["status"] for x in lines] == ["accepted", "accepted", "uncertain"]
    checker.reset()
    assert checker.history == [] and checker.events == []
    assert checker.observe(frame(4)).step == 0
    episodes = [json.loads(x)["episode"] for x in log.read_text().splitlines()]
    assert episodes == [0, 0, 0, 1]


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(window=13), dict(confirm=0), dict(threshold=1.0),
                                    dict(mode="slow")])
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        make(**kwargs)


def test_parse_failure_is_a_doubt_not_a_crash():
    engine = PixelOracle(reply="<think>the reasoning was cut off")
    checker = ProcedureChecker(TPRU(engine=engine), mode="reason", confirm=2)
    events = [checker.observe(frame(s)) for s in (1, 2, 3)]
    assert [e.status for e in events] == [Status.ACCEPTED, Status.UNCERTAIN, Status.REJECTED]
    assert "cut off" in events[1].raw and "error" in events[1].details


def test_return_to_the_last_accepted_state_is_accepted_and_a_stall_costs_no_call():
    checker, engine = make(confirm=3)
    for s in (1, 2, 3):
        checker.observe(frame(s))
    assert checker.observe(frame(8)).status == Status.UNCERTAIN
    calls = engine.score_calls
    stalled = checker.observe(frame(8))  # the same wrong frame again: the earlier verdict, no model call
    assert stalled.duplicate and stalled.status == Status.UNCERTAIN and engine.score_calls == calls
    back = checker.observe(frame(3))  # back at the last accepted state
    assert back.duplicate and back.status == Status.ACCEPTED


def test_progress_reaches_the_end_of_a_long_reference():
    reference = [frame(s) for s in range(1, 25)]
    checker, _ = make(reference=reference, window=3, threshold=1e-6)  # every 4th step: accept the jumps
    events = [checker.observe(frame(s)) for s in range(1, 25, 4)] + [checker.observe(frame(24))]
    assert events[-1].matched_step == 23 and events[-1].progress == pytest.approx(1.0)


def test_reference_as_an_explicit_list_keeps_its_order_and_a_video_gives_reference_frames(tmp_path):
    """A folder is read in natural file-name order; a list is used as given; a video is sampled evenly."""
    from episode_data import frame as episode_frame
    from episode_data import write_video

    from tpru_agent.checker import same_frame

    reference = [frame(s) for s in (1, 2, 3, 4)]
    names = ["d.png", "c.png", "b.png", "a.png"]  # file-name order is the reverse of time order here
    for name, image in zip(names, reference):
        image.save(tmp_path / name)
    listed, _ = make(reference=[tmp_path / n for n in names])
    assert [same_frame(a, b) for a, b in zip(listed.reference, reference)] == [True] * 4
    folder, _ = make(reference=tmp_path)
    assert [same_frame(a, b) for a, b in zip(folder.reference, reference[::-1])] == [True] * 4
    write_video(tmp_path / "demo.mp4", [episode_frame((40, 90, 160), i, 24) for i in range(24)])
    video, _ = make(reference=tmp_path / "demo.mp4", reference_frames=8)
    assert len(video.reference) == 8
    assert len(make(reference=tmp_path / "demo.mp4")[0].reference) == 16


def test_no_change_seen_by_verify_step_is_a_duplicate_not_a_doubt():
    checker, _ = make(duplicate_threshold=0.0)  # the checker's own test never fires
    checker.observe(frame(1))
    checker.observe(frame(2))
    event = checker.observe(frame(2))
    assert event.status == Status.ACCEPTED and event.duplicate


def test_a_lenient_parse_is_flagged_on_the_event():
    engine = PixelOracle(reply="<think>x</think><answer>(A)</answer>")
    checker = ProcedureChecker(TPRU(engine=engine), mode="reason")
    events = [checker.observe(frame(s)) for s in (1, 2)]
    assert events[1].status == Status.ACCEPTED and events[1].lenient and not events[0].lenient


def test_each_frame_is_loaded_once_per_observation(monkeypatch):
    """The checker loads the observation; verify_step under it loads nothing again (it used to load it 3 times).

    The tiny model's decode and resize counts are in tests/test_load_once.py."""
    import tpru_agent.frames as frames_module

    calls = []

    def counting(real):
        return lambda *a, **k: calls.append(real.__name__) or real(*a, **k)

    for name in ("load_frame", "load_frames"):
        monkeypatch.setattr(frames_module, name, counting(getattr(frames_module, name)))
    checker, engine = make(window=2)
    events = [checker.observe(frame(s)) for s in range(1, 4)]
    assert [e.status for e in events] == [Status.ACCEPTED] * 3 and engine.score_calls == 2
    assert calls == ["load_frame"] * 3  # one per observed frame, all in the checker


def test_events_record_settings_and_usage():
    checker, _ = make(window=2, threshold=0.6)
    first, second = checker.observe(frame(1)), checker.observe(frame(2))
    for event in (first, second):
        assert event.settings["mode"] == "fast" and event.settings["threshold"] == 0.6
        assert event.settings["engine"] == "oracle" and event.settings["window"] == 2
        assert event.usage == {"prompt_tokens": 0, "image_tokens": 0, "generated_tokens": 0}  # a custom engine
    assert {"settings", "usage"} <= set(second.to_dict())
