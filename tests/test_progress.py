"""TPRU.progress and the pure aggregation behind it: tables for the maths, the oracle for the facade logic,
the classic engine and the tiny Qwen2.5-VL for real engines."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from episode_data import frame as episode_frame
from oracle import PixelOracle
from oracle import frame as oracle_frame

from tpru_agent import TPRU, ConfigError, FrameError
from tpru_agent import progress as P
from tpru_agent.pairwise import covering_windows


# ----------------------------------------------------------------------------------------------- pure tables
@pytest.mark.parametrize("x, y, expected", [
    ([1, 2, 3], [10, 20, 30], 1.0),
    ([3, 2, 1], [10, 20, 30], -1.0),
    ([1, 1, 2], [1, 2, 3], pytest.approx(0.8660254)),   # ties get average ranks
    ([0.5, 0.5, 0.5], [1, 2, 3], 0.0),                     # a constant prediction orders nothing
    ([0.1, 0.4, 0.2, 0.9], [0, 2, 1, 3], 1.0),
])
def test_spearman_table(x, y, expected):
    assert P.spearman(x, y) == expected


def test_spearman_refuses_mismatched_lengths():
    with pytest.raises(ConfigError, match="same length"):
        P.spearman([1, 2], [1, 2, 3])


@pytest.mark.parametrize("pref, expected", [
    ([[0, 1, 1], [0, 0, 1], [0, 0, 0]], [0.0, 0.5, 1.0]),            # certain: exact fractions of the episode
    ([[0, 0.5], [0.5, 0]], [0.5, 0.5]),                               # no opinion: flat
    ([[0, 0.9, 0.8], [0.1, 0, 0.7], [0.2, 0.3, 0]], [0.15, 0.6, 0.75]),
])
def test_expected_rank_table(pref, expected):
    assert P.expected_rank(pref) == pytest.approx(expected)


def test_direction_free_detects_reversal_symmetry():
    assert P.direction_free([{(0, 1, 2): 0.3, (2, 1, 0): 0.3, (1, 0, 2): 0.2, (2, 0, 1): 0.2}])
    assert not P.direction_free([{(0, 1, 2): 0.6, (2, 1, 0): 0.4}])


def test_seriation_recovers_a_line_up_to_direction():
    truth = [3, 0, 5, 1, 4, 2]
    sep = np.abs(np.subtract.outer(truth, truth)) / 5.0
    assert abs(P.spearman(P.seriate(sep), truth)) == pytest.approx(1.0)


def test_orient_follows_the_guide():
    assert P.orient([0.0, 1.0, 0.5], [2, 0, 1]) == [1.0, 0.0, 0.5]
    assert P.orient([0.0, 1.0, 0.5], [0, 2, 1]) == [0.0, 1.0, 0.5]


def test_slot_distribution_conditions_on_the_anchor_order():
    # query 3 among anchors 0 < 1 < 2; orders breaking the anchor order carry no weight
    dist = {(3, 0, 1, 2): 0.2, (0, 3, 1, 2): 0.2, (0, 1, 2, 3): 0.2, (2, 1, 0, 3): 0.4}
    assert P.slot_distribution(dist, 3, [0, 1, 2]) == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3])
    assert P.slot_midpoints([0.25, 0.5, 0.75]) == pytest.approx([0.125, 0.375, 0.625, 0.875])


@pytest.mark.parametrize("length, indices", [(2, [0, 1]), (9, [2, 4, 6]), (16, [4, 8, 11])])
def test_anchor_indices(length, indices):
    picked, fractions = P.anchor_indices(length)
    assert picked == indices
    assert fractions == pytest.approx([i / (length - 1) for i in indices])


# ----------------------------------------------------------------------------------------------- the facade (oracle)
def _shuffled(n: int, seed: int = 0):
    steps = list(range(n))
    random.Random(seed).shuffle(steps)
    return steps


@pytest.mark.parametrize("n", [2, 4, 7, 16])
def test_oracle_progress_is_perfect_and_costs_the_covering_windows(n):
    steps = _shuffled(n)
    engine = PixelOracle()
    result = TPRU(engine=engine, budget=None).progress([oracle_frame(s) for s in steps])
    assert P.voc(result.values, steps) == pytest.approx(1.0)
    assert [steps[i] for i in result.order] == sorted(steps)
    assert result.method == "rank" and result.direction_known
    assert result.passes == len(covering_windows(n)) == engine.score_calls
    assert all(0.0 <= v <= 1.0 for v in result.values) and len(result.frame_confidence) == n
    assert set(result.alternatives) == {"seriation"}
    assert result.timings["calls"] == result.passes and result.timings["total_s"] > 0
    json.dumps(result.to_dict())


def test_sixteen_frames_take_twenty_passes():
    assert len(covering_windows(16)) == 20
    result = TPRU(engine=PixelOracle(), budget=None).progress([oracle_frame(s) for s in _shuffled(16, 3)])
    assert result.passes == 20


@pytest.mark.parametrize("method, passes", [("reference", 4), ("anchored", 1 + 2)])
def test_oracle_with_reference(method, passes):
    steps = [15, 2, 21, 9]  # one frame in each slot of the anchors (steps 6, 12, 18 of the demonstration)
    reference = [oracle_frame(s) for s in range(0, 25, 3)]
    result = TPRU(engine=PixelOracle(), budget=None).progress([oracle_frame(s) for s in steps], reference=reference,
                                                              method=method)
    assert result.method == method and result.direction_known and result.passes == passes
    assert P.voc(result.values, steps) == pytest.approx(1.0)
    if method == "reference":  # the expected slot midpoints, i.e. where in the demonstration each frame falls
        assert result.values == pytest.approx((0.625, 0.125, 0.875, 0.375), abs=0.05)


def test_auto_with_a_reference_anchors_the_window_values():
    result = TPRU(engine=PixelOracle(), budget=None).progress([oracle_frame(s) for s in (2, 0, 1)],
                                                              reference=[oracle_frame(s) for s in range(3)])
    assert result.method == "anchored" and "rank" in result.alternatives


@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "median"}, ConfigError, "method must be one of"),
    ({"method": "reference"}, ConfigError, "needs reference="),
    ({"mode": "slow"}, ConfigError, "mode must be one of"),
])
def test_bad_options_are_typed_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        TPRU(engine=PixelOracle(), budget=None).progress([oracle_frame(0), oracle_frame(1)], **kwargs)


def test_one_frame_is_refused():
    with pytest.raises(FrameError, match="between 2 and 64"):
        TPRU(engine=PixelOracle(), budget=None).progress([oracle_frame(0)])


# ----------------------------------------------------------------------------------------------- real engines
def _episode(n: int = 10):
    return [episode_frame((60, 120, 180), i, n) for i in range(n)]


def test_classic_says_direction_is_a_guess_and_orders_the_path():
    frames = _episode()
    steps = _shuffled(len(frames), 5)
    model = TPRU("classic")
    shuffled = model.progress([frames[s] for s in steps])
    assert not shuffled.direction_known and shuffled.method == "seriation"
    assert set(shuffled.alternatives["rank"]) == {0.5}  # reversal-symmetric: the expected rank is flat
    assert abs(P.voc(shuffled.values, steps)) > 0.9
    assert shuffled.confidence <= 0.5 + 1e-9  # a path and its reverse share the mass
    in_order = model.progress(frames)  # direction guessed from the input order: right for an ordered episode
    assert P.voc(in_order.values, range(len(frames))) > 0.9


def test_classic_with_a_reference_knows_the_direction():
    frames = _episode()
    steps = _shuffled(len(frames), 6)
    reference = [episode_frame((70, 110, 170), i, 7) for i in range(7)]
    result = TPRU("classic").progress([frames[s] for s in steps], reference=reference)
    assert result.direction_known and result.method == "anchored"
    assert P.voc(result.values, steps) > 0.9


def test_tiny_hf_model_runs_progress(tiny_checkpoint, frames4):
    with TPRU(tiny_checkpoint) as model:
        result = model.progress(frames4 + frames4[:1][::-1] + [frames4[1].rotate(90)])
    assert result.engine == "hf" and result.mode == "fast" and len(result.values) == 6
    assert all(0.0 <= v <= 1.0 for v in result.values) and sorted(result.order) == list(range(6))
    assert result.passes == len(covering_windows(6)) and result.direction_known
    assert 0.0 < result.confidence <= 1.0
