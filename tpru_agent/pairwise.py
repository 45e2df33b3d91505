"""Ordering more frames than one question holds: covering windows and a pairwise (Kemeny-style) aggregation.

TPRU was trained on 4-frame questions. For ``n > 4`` frames we ask about 4-frame windows chosen so that every pair
of frames appears together in at least one window (a greedy covering design: about ``n(n-1)/12`` windows, e.g. 6
for 8 frames, 20 for 16, 336 for 64). Each window's answer distribution over its 24 permutations gives, for every
pair (i, j) in it, ``P(i before j)``. The final order maximises the summed pairwise agreement
``sum_{i before j} P(i before j)`` (the weighted linear-ordering / Kemeny objective): exactly by dynamic
programming over subsets for ``n <= 12``, else by a Copeland ranking refined with insertion moves until no move
helps. When every window is answered correctly with certainty the pairwise preferences form a transitive tournament
and the true order is the unique optimum, so it is recovered exactly.

The classic engine, which sees no direction, orders any number of frames by :func:`shortest_path` instead (the
pairwise preferences of a direction-blind engine are all 0.5, and the aggregation would echo the input; issue 14).

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


#: Up to this many frames :func:`shortest_path` is exact (dynamic programming over subsets, ~n^2 2^n steps).
EXACT_PATH_LIMIT = 10
#: Beyond it, local search starts from about this many frames (evenly spread over the inputs).
MAX_STARTS = 12


def path_length(path: Sequence[int], dist: Sequence[Sequence[float]]) -> float:
    """Summed distance between consecutive frames of ``path``."""
    return sum(dist[a][b] for a, b in zip(path, path[1:]))


def shortest_path(dist: Sequence[Sequence[float]]) -> tuple[int, ...]:
    """The shortest path visiting every frame once (an open path: any start, any end) through a distance matrix.

    Exact for ``n <= EXACT_PATH_LIMIT``; beyond, the best of nearest-neighbour paths from ~``MAX_STARTS`` starts, each
    improved by segment reversals and single-frame moves until neither helps (a local optimum, as for the
    Kemeny search above). Which end comes first is arbitrary: a path and its reverse are equally long.

    Example:
        >>> shortest_path([[0, 1, 5, 2], [1, 0, 4, 9], [5, 4, 0, 3], [2, 9, 3, 0]])   # 2-3-0-1: 3 + 2 + 1
        (2, 3, 0, 1)
    """
    n = len(dist)
    if n <= 2:
        return tuple(range(n))
    if n <= EXACT_PATH_LIMIT:
        return _exact_path(dist)
    best: tuple[float, list[int]] | None = None
    for start in sorted(set(range(0, n, max(1, n // MAX_STARTS)))):
        path = _improve(_nearest_neighbour(start, dist), dist)
        length = path_length(path, dist)
        if best is None or length < best[0] - 1e-12:
            best = (length, path)
    return tuple(best[1])


def _exact_path(dist: Sequence[Sequence[float]]) -> tuple[int, ...]:
    n = len(dist)
    full = (1 << n) - 1
    # cost[mask][k]: shortest path through the frames in `mask` ending at k
    cost = [[float("inf")] * n for _ in range(1 << n)]
    back = [[-1] * n for _ in range(1 << n)]
    for k in range(n):
        cost[1 << k][k] = 0.0
    for mask in range(1, 1 << n):
        row = cost[mask]
        for k in range(n):
            base = row[k]
            if base == float("inf"):
                continue
            for j in range(n):
                if mask >> j & 1:
                    continue
                nxt, value = mask | 1 << j, base + dist[k][j]
                if value < cost[nxt][j] - 1e-12:
                    cost[nxt][j], back[nxt][j] = value, k
    end = min(range(n), key=lambda k: cost[full][k])
    path, mask = [], full
    while end != -1:
        path.append(end)
        end, mask = back[mask][end], mask & ~(1 << end)
    return tuple(reversed(path))


def _nearest_neighbour(start: int, dist: Sequence[Sequence[float]]) -> list[int]:
    path, left = [start], set(range(len(dist))) - {start}
    while left:
        last = path[-1]
        nxt = min(left, key=lambda j: (dist[last][j], j))
        path.append(nxt)
        left.discard(nxt)
    return path


def _link(dist: Sequence[Sequence[float]], left: int | None, item: int, right: int | None) -> float:
    """What ``item`` adds to a path between ``left`` and ``right`` (``None``: a path end)."""
    add = (dist[left][item] if left is not None else 0.0) + (dist[item][right] if right is not None else 0.0)
    return add - (dist[left][right] if left is not None and right is not None else 0.0)


def _improve(path: list[int], dist: Sequence[Sequence[float]]) -> list[int]:
    """Segment reversals (2-opt on an open path) and single-frame moves until no move shortens the path."""
    n = len(path)

    def edge(a: int, b: int) -> float:  # positions; an edge past either end costs nothing
        return dist[path[a]][path[b]] if 0 <= a < n and 0 <= b < n else 0.0

    improved = True
    while improved:
        improved = False
        for i in range(n - 1):
            for j in range(i + 1, n):
                # reverse path[i..j]: edges (i-1, i) and (j, j+1) become (i-1, j) and (i, j+1)
                if edge(i - 1, i) + edge(j, j + 1) - edge(i - 1, j) - edge(i, j + 1) > 1e-12:
                    path[i:j + 1] = path[i:j + 1][::-1]
                    improved = True
        for i in range(n):
            item, rest = path[i], path[:i] + path[i + 1:]
            best_y, best_add = None, _link(dist, path[i - 1] if i else None, item, path[i + 1] if i < n - 1 else None)
            for y in range(n):  # insert before rest[y]; y == n - 1: at the end
                add = _link(dist, rest[y - 1] if y else None, item, rest[y] if y < n - 1 else None)
                if add < best_add - 1e-12:
                    best_y, best_add = y, add
            if best_y is not None:
                path[:] = rest[:best_y] + [item] + rest[best_y:]
                improved = True
    return path
