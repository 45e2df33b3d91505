"""Windowed ordering: covering windows and pairwise aggregation recover a known order."""

from __future__ import annotations

import itertools
import random

import pytest

from tpru_agent.pairwise import agreement, best_order, covering_windows, pairwise_preferences


@pytest.mark.parametrize("n", [2, 4, 5, 7, 9, 16, 33, 64])
def test_windows_cover_every_pair(n):
    windows = covering_windows(n)
    assert all(len(w) == min(n, 4) for w in windows)
    covered = {p for w in windows for p in itertools.combinations(w, 2)}
    assert covered == set(itertools.combinations(range(n), 2))
    assert covering_windows(n) == windows  # deterministic


@pytest.mark.parametrize("n", [5, 8, 12, 13, 20, 64])
def test_correct_windows_recover_the_order(n):
    truth = list(range(n))
    random.Random(n).shuffle(truth)
    rank = {f: i for i, f in enumerate(truth)}
    votes = [(w, {tuple(sorted(w, key=rank.get)): 1.0}) for w in covering_windows(n)]
    assert list(best_order(pairwise_preferences(n, votes))) == truth


def test_soft_and_noisy_votes_still_recover_when_the_majority_is_right():
    n = 9
    truth = list(range(n))
    random.Random(1).shuffle(truth)
    rank = {f: i for i, f in enumerate(truth)}
    votes = []
    for k, w in enumerate(covering_windows(n)):
        right = tuple(sorted(w, key=rank.get))
        wrong = right[1::-1] + right[2:]  # first two swapped
        votes.append((w, {right: 0.7, wrong: 0.3} if k % 2 else {right: 0.55, wrong: 0.45}))
    pref = pairwise_preferences(n, votes)
    order = best_order(pref)
    assert list(order) == truth
    assert agreement(order, pref) >= agreement(tuple(reversed(order)), pref)


def test_exact_matches_brute_force_on_random_preferences():
    rng = random.Random(3)
    n = 6
    pref = [[0.0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        p = rng.random()
        pref[i][j], pref[j][i] = p, 1 - p
    brute = max(itertools.permutations(range(n)), key=lambda o: agreement(o, pref))
    assert agreement(best_order(pref), pref) == pytest.approx(agreement(brute, pref))


@pytest.mark.parametrize("n", [3, 6, 9, 10])
def test_shortest_path_is_exact_up_to_the_limit(n):
    from tpru_agent.pairwise import path_length, shortest_path

    rng = random.Random(n)
    points = [(rng.random(), rng.random()) for _ in range(n)]
    dist = [[abs(a[0] - b[0]) + abs(a[1] - b[1]) for b in points] for a in points]
    brute = min(path_length(p, dist) for p in itertools.permutations(range(n)))
    found = shortest_path(dist)
    assert sorted(found) == list(range(n)) and path_length(found, dist) == pytest.approx(brute)


@pytest.mark.parametrize("n", [11, 24, 64])
def test_shortest_path_recovers_a_shuffled_line_beyond_the_exact_limit(n):
    from tpru_agent.pairwise import shortest_path

    rng = random.Random(n)
    positions = sorted(rng.random() for _ in range(n))
    shown = list(range(n))
    rng.shuffle(shown)
    dist = [[abs(positions[a] - positions[b]) for b in shown] for a in shown]
    got = [shown[i] for i in shortest_path(dist)]
    assert got in (list(range(n)), list(range(n))[::-1])
