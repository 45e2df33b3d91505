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


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(confirm=0), dict(threshold=1.0), dict(mode="slow")])
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        make(**kwargs)
