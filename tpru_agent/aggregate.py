"""Ordering more frames than one question holds: covering windows and a pairwise (Kemeny-style) aggregation.

TPRU was trained on 4-frame questions. For ``n > 4`` frames we ask about 4-frame windows chosen so that every pair
of frames appears together in at least one window (a greedy covering design: about ``n(n-1)/12`` windows, e.g. 6
for 8 frames, 20 for 16, 336 for 64). Each window's answer distribution over its 24 permutations gives, for every
pair (i, j) in it, ``P(i before j)``. The final order maximises the summed pairwise agreement
``sum_{i before j} P(i before j)`` (the weighted linear-ordering / Kemeny objective): exactly by dynamic
programming over subsets for ``n <= 12``, else by a Copeland ranking refined with insertion moves until no move
helps. When every window is answered correctly with certainty the pairwise preferences form a transitive tournament
and the true order is the unique optimum, so it is recovered exactly.

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

EXACT_LIMIT = 12


def covering_windows(n: int, size: int = 4) -> list[tuple[int, ...]]:
    """Windows of ``size`` indices out of ``range(n)`` such that every pair shares at least one window.

    Deterministic greedy: start each window from the least-covered uncovered pair, then add the index covering the
    most still-uncovered pairs (ties: least used, then lowest index).

    Example:
        >>> covering_windows(4)
        [(0, 1, 2, 3)]
        >>> len(covering_windows(8))
        6
    """
    if n <= size:
        return [tuple(range(n))]
    uncovered = {(i, j) for i in range(n) for j in range(i + 1, n)}
    used = [0] * n
    windows: list[tuple[int, ...]] = []
    while uncovered:
        i, j = min(uncovered, key=lambda p: (used[p[0]] + used[p[1]], p))
        window = [i, j]
        while len(window) < size:
            def gain(k: int) -> tuple[int, int, int]:
                new = sum((min(k, w), max(k, w)) in uncovered for w in window)
                return (-new, used[k], k)
            window.append(min((k for k in range(n) if k not in window), key=gain))
        window.sort()
        for a, b in itertools.combinations(window, 2):
            uncovered.discard((a, b))
        for k in window:
            used[k] += 1
        windows.append(tuple(window))
    return windows


def pairwise_preferences(n: int, votes: Iterable[tuple[Sequence[int], dict[tuple[int, ...], float]]]
                         ) -> list[list[float]]:
    """Average ``P(i before j)`` over the windows holding both ``i`` and ``j`` (0 where never compared).

    Args:
        n: number of frames.
        votes: per window, its global indices and a distribution over orders of those indices (each order a
            tuple of global indices, first in time first; probabilities summing to ~1).
    """
    total = [[0.0] * n for _ in range(n)]
    count = [[0] * n for _ in range(n)]
    for window, dist in votes:
        for a, b in itertools.combinations(window, 2):
            p_ab = sum(p for order, p in dist.items() if order.index(a) < order.index(b))
            total[a][b] += p_ab
            total[b][a] += 1.0 - p_ab
            count[a][b] += 1
            count[b][a] += 1
    return [[total[i][j] / count[i][j] if count[i][j] else 0.0 for j in range(n)] for i in range(n)]


def agreement(order: Sequence[int], pref: list[list[float]]) -> float:
    """The objective: summed ``P(i before j)`` over the pairs the order puts ``i`` before ``j``."""
    return sum(pref[a][b] for x, a in enumerate(order) for b in order[x + 1:])


def best_order(pref: list[list[float]]) -> tuple[int, ...]:
    """The order maximising :func:`agreement` (exact for ``n <= 12``, local search beyond)."""
    n = len(pref)
    if n <= EXACT_LIMIT:
        return _exact(pref)
    return _local_search(pref)


def _exact(pref: list[list[float]]) -> tuple[int, ...]:
    n = len(pref)
    # best[mask] = best agreement of an order of the frames in `mask` placed first; appending k after them adds
    # sum of pref[i][k] for i in mask.
    best = [float("-inf")] * (1 << n)
    back = [-1] * (1 << n)
    best[0] = 0.0
    gain_into = [[pref[i][k] for i in range(n)] for k in range(n)]
    for mask in range(1 << n):
        base = best[mask]
        if base == float("-inf"):
            continue
        members = [i for i in range(n) if mask >> i & 1]
        for k in range(n):
            if mask >> k & 1:
                continue
            value = base + sum(gain_into[k][i] for i in members)
            nxt = mask | 1 << k
            if value > best[nxt] + 1e-12:
                best[nxt] = value
                back[nxt] = k
    order, mask = [], (1 << n) - 1
    while mask:
        k = back[mask]
        order.append(k)
        mask &= ~(1 << k)
    return tuple(reversed(order))


def _local_search(pref: list[list[float]]) -> tuple[int, ...]:
    n = len(pref)
    wins = [sum(pref[i][j] > pref[j][i] for j in range(n)) + 1e-6 * sum(pref[i]) for i in range(n)]
    order = sorted(range(n), key=lambda i: -wins[i])
    improved = True
    while improved:
        improved = False
        for x in range(n):
            item = order[x]
            rest = order[:x] + order[x + 1:]
            # gain of placing `item` at position y of `rest`: pref[item][after] for those after, pref[before][item]
            best_y, best_v = x, None
            for y in range(n):
                v = sum(pref[b][item] for b in rest[:y]) + sum(pref[item][a] for a in rest[y:])
                if best_v is None or v > best_v + 1e-12:
                    best_y, best_v = y, v
            if best_y != x:
                current = sum(pref[b][item] for b in rest[:x]) + sum(pref[item][a] for a in rest[x:])
                if best_v > current + 1e-12:
                    order = rest[:best_y] + [item] + rest[best_y:]
                    improved = True
    return tuple(order)
