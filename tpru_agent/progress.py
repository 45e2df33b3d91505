"""Per-frame task progress from the model's temporal preferences (``TPRU.progress``), and VOC.

Robot-learning users read a progress value per frame (GVL / OpenGVL, TOPReward, Robometer) as a dense reward, to
weight behaviour cloning, or to filter demonstrations; the field scores it as **value-order correlation (VOC)**:
the Spearman correlation between an episode's per-frame values and their true time order, frames shuffled.
TOPReward (arXiv 2602.19313) showed that reading probabilities instead of asking for a number lifts VOC a lot, so
every value here comes from answer probabilities, never from one hard order:

- ``"rank"`` (default when the model has a sense of direction): the frames are asked about in TPRU's 4-frame
  ordering questions over covering windows (every pair of frames shares a window: 20 fast-mode passes for 16
  frames, see :mod:`tpru_agent.pairwise`); each window's distribution over its 24 orders gives ``P(i before j)``
  for its pairs; a frame's progress is its **expected rank**, ``mean_j P(j before i)``, which is the share of the
  other frames that come before it. With evenly sampled frames that is the fraction of the episode done.
- ``"seriation"``: direction-free. The expected distance in order of each pair (``E|pos(i) - pos(j)|`` within the
  window orders) is embedded on a line (classical MDS, first coordinate); the line is oriented by the expected
  ranks. An engine whose probabilities are symmetric under reversal (the classic engine: a path and its reverse
  are equally short) gives all ``P(i before j) = 0.5``, so the expected rank is flat and only this method says
  anything; its direction is then **a guess** (taken from the input order, which is right when frames come in time
  order as in labelling, and a coin flip for shuffled frames). ``ProgressResult.direction_known`` says which.
- ``"reference"`` (when a ``reference`` demonstration is given): three reference frames at 1/4, 1/2 and 3/4 of the
  demonstration and one query frame form each question (one pass per query frame). The answer distribution,
  conditioned on the reference frames being in their known order, says in which of the four slots the query frame
  falls; its progress is the expected slot midpoint. The reference fixes the direction, for every engine.

Windows show their frames in a fixed pseudo-random order (not the input order), so a model's bias for answering
in label order cannot turn input order into progress.

Pure aggregation (numpy, no torch) plus :func:`estimate`, which asks the questions through ``TPRU.ask``.

Example:
    >>> pref = [[0.0, 0.9, 0.8], [0.1, 0.0, 0.7], [0.2, 0.3, 0.0]]
    >>> [round(v, 2) for v in expected_rank(pref)]
    [0.15, 0.6, 0.75]
    >>> spearman([0.1, 0.5, 0.9], [0, 1, 2])
    1.0
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from typing import Sequence

import numpy as np

from tpru_agent import calls, pairwise
from tpru_agent.errors import ConfigError, ParseError
from tpru_agent.results import ProgressResult
from tpru_agent.tasks import ordering
from tpru_agent.tasks.question import MAX_ORDER_LABELS

log = logging.getLogger(__name__)

METHODS = ("auto", "rank", "seriation", "reference", "anchored")
#: Window distributions whose every order has its reverse within this probability are direction-free.
SYMMETRY_TOL = 1e-6
#: Where the reference frames sit in the demonstration (fractions of its length): four equal slots.
ANCHORS = (0.25, 0.5, 0.75)
#: Pairs of opposite-end frames placed against the reference to orient window values ("anchored"; 2 passes each).
ORIENT_PAIRS = 1

Dist = dict  # tuple of global frame indices (first in time first) -> probability


# ----------------------------------------------------------------------------------------------- pure aggregation
def expected_rank(pref: Sequence[Sequence[float]]) -> list[float]:
    """Per frame, ``mean_{j != i} P(j before i)``: 0 for a frame surely first, 1 for one surely last."""
    n = len(pref)
    if n < 2:
        return [0.5] * n
    return [sum(pref[j][i] for j in range(n) if j != i) / (n - 1) for i in range(n)]


def direction_free(dists: Sequence[Dist], tol: float = SYMMETRY_TOL) -> bool:
    """True when every distribution gives each order the probability of its reverse (no sense of direction)."""
    return all(abs(p - dist.get(order[::-1], 0.0)) <= tol for dist in dists for order, p in dist.items())


def expected_separation(n: int, votes: Sequence[tuple[Sequence[int], Dist]]) -> np.ndarray:
    """``E|pos(i) - pos(j)| / (window size - 1)`` averaged over the windows holding both (direction-free)."""
    total = np.zeros((n, n))
    count = np.zeros((n, n))
    for window, dist in votes:
        span = max(len(window) - 1, 1)
        for a, b in itertools.combinations(window, 2):
            sep = sum(p * abs(order.index(a) - order.index(b)) for order, p in dist.items()) / span
            total[a, b] += sep
            total[b, a] += sep
            count[a, b] += 1
            count[b, a] += 1
    return np.divide(total, count, out=np.full((n, n), 0.5), where=count > 0) * (1 - np.eye(n))


def seriate(sep: np.ndarray) -> list[float]:
    """Classical MDS of the separations onto one line, rescaled to [0, 1] (orientation arbitrary)."""
    n = sep.shape[0]
    centre = np.eye(n) - np.full((n, n), 1.0 / n)
    gram = -0.5 * centre @ (sep ** 2) @ centre
    _, vectors = np.linalg.eigh(gram)
    coord = vectors[:, -1]
    return rescale(coord.tolist())


def rescale(values: Sequence[float]) -> list[float]:
    """Min-max to [0, 1]; all equal -> all 0.5."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return [0.5] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties averaged); 0.0 when either side is constant (no order to correlate).

    Raises:
        ConfigError: the sequences differ in length or hold fewer than 2 values.
    """
    if len(x) != len(y) or len(x) < 2:
        raise ConfigError(f"spearman needs two sequences of the same length >= 2, got {len(x)} and {len(y)}")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx <= 0 or vy <= 0:
        return 0.0
    return cov / math.sqrt(vx * vy)


def voc(values: Sequence[float], times: Sequence[float]) -> float:
    """Value-order correlation: Spearman between predicted values and the frames' true times (or indices)."""
    return spearman(values, times)


def implied_order(values: Sequence[float]) -> tuple[int, ...]:
    """Input indices sorted by value (ties: input order)."""
    return tuple(sorted(range(len(values)), key=lambda i: (values[i], i)))


def orient(values: Sequence[float], guide: Sequence[float]) -> list[float]:
    """``values`` or ``1 - values``, whichever agrees (Spearman) with ``guide``; ``values`` on a tie."""
    return list(values) if spearman(values, guide) >= 0 else [1.0 - v for v in values]


def window_confidence(order: Sequence[int], votes: Sequence[tuple[Sequence[int], Dist]]) -> tuple[float, list]:
    """Geometric mean over windows of P(the order restricted to the window), and per frame the mean over its
    windows (as ``TPRU.order_frames`` reports for more than 4 frames)."""
    rank = {frame: pos for pos, frame in enumerate(order)}
    per_frame: dict[int, list[float]] = {i: [] for i in order}
    log_sum = 0.0
    for window, dist in votes:
        p = dist.get(tuple(sorted(window, key=rank.get)), 0.0)
        log_sum += math.log(max(p, 1e-12))
        for i in window:
            per_frame[i].append(p)
    frame_conf = [sum(per_frame[i]) / len(per_frame[i]) if per_frame[i] else 0.0 for i in range(len(order))]
    return math.exp(log_sum / max(len(votes), 1)), frame_conf


def slot_distribution(dist: Dist, query: int, anchors: Sequence[int]) -> list[float]:
    """P(query falls in slot k among the anchors), given the anchors are in their listed order (k = 0..len)."""
    mass = [0.0] * (len(anchors) + 1)
    for order, p in dist.items():
        if [i for i in order if i != query] != list(anchors):
            continue
        mass[sum(1 for i in order[: order.index(query)] if i in anchors)] += p
    total = sum(mass)
    return [m / total for m in mass] if total > 0 else [1.0 / len(mass)] * len(mass)


def slot_midpoints(positions: Sequence[float]) -> list[float]:
    """Midpoints of the slots the anchors at ``positions`` (fractions of the demonstration) cut [0, 1] into."""
    edges = [0.0, *positions, 1.0]
    return [(a + b) / 2 for a, b in zip(edges, edges[1:])]


def anchor_indices(length: int, fractions: Sequence[float] = ANCHORS) -> tuple[list[int], list[float]]:
    """Distinct reference indices near ``fractions`` of a ``length``-frame demonstration, and their true fractions."""
    if length < 2:
        raise ConfigError(f"a reference demonstration needs at least 2 frames, got {length}")
    picked = sorted({min(length - 1, max(0, round(f * (length - 1)))) for f in fractions})
    picked = picked[: MAX_ORDER_LABELS - 1]
    return picked, [i / (length - 1) for i in picked]


# ----------------------------------------------------------------------------------------------- asking the model
def _shown(window: Sequence[int], salt: str) -> list[int]:
    """The window's frames in a fixed pseudo-random display order (independent of the input order)."""
    shown = list(window)
    random.Random(f"{salt}:{list(window)}").shuffle(shown)
    return shown


def _ask_window(tpru, question, images: Sequence, shown: Sequence[int], mode: str):
    """Ask one ordering question over ``images[shown]``; its distribution over global orders, the answer."""
    pics = [images[i] for i in shown]
    try:
        ans = tpru.ask(question, pics, mode=mode)
    except ParseError as exc:  # one unparsable window must not sink the call: use its scores
        log.warning("progress window %s: %s; using its fast-mode scores", list(shown), str(exc).split("; raw")[0])
        ans = tpru.ask(question, pics, mode="fast")
    labels = question.labels
    dist = {tuple(shown[labels.index(c)] for c in perm): p for perm, p in ans.probabilities.items()}
    return dist, ans


def _window_values(tpru, images: Sequence, description, mode: str):
    n = len(images)
    windows = pairwise.covering_windows(n, MAX_ORDER_LABELS)
    votes, answers = [], []
    for window in windows:
        question = ordering.build(len(window), description=description)
        dist, ans = _ask_window(tpru, question, images, _shown(window, "progress"), mode)
        votes.append((tuple(window), dist))
        answers.append(ans)
    pref = pairwise.pairwise_preferences(n, votes)
    free = direction_free([d for _, d in votes])
    rank_values = [0.5] * n if free else expected_rank(pref)  # exactly flat: no rounding noise posing as order
    guide = list(range(n)) if free else rank_values
    seriation_values = orient(seriate(expected_separation(n, votes)), guide)
    return {"rank": rank_values, "seriation": seriation_values}, votes, answers, not free


def _reference_values(tpru, images: Sequence, reference: Sequence, description, mode: str):
    anchors, positions = anchor_indices(len(reference))
    mids = slot_midpoints(positions)
    pool = [reference[i] for i in anchors] + list(images)  # anchors are pool indices 0..k-1
    k = len(anchors)
    question = ordering.build(k + 1, description=description)
    values, frame_conf, answers = [], [], []
    for q in range(len(images)):
        shown = list(range(k))
        shown.insert(q % (k + 1), k + q)  # rotate the query's label so position bias averages out
        dist, ans = _ask_window(tpru, question, pool, shown, mode)
        slots = slot_distribution(dist, k + q, list(range(k)))
        values.append(sum(p * m for p, m in zip(slots, mids)))
        frame_conf.append(max(slots))
        answers.append(ans)
    return values, frame_conf, answers


def _orient_by_reference(tpru, images: Sequence, reference: Sequence, values: list[float], description,
                         mode: str, pairs: int = ORIENT_PAIRS):
    """Mirror ``values`` unless the reference says the low end comes first.

    Each question shows the demonstration's first and last frames and one frame from an end of ``values``;
    conditioned on the demonstration's frames in their known order, the query falls before, between or after them
    (slot 0, 1, 2). The low end should sit in an earlier slot than the high end. Asking about each end on its own
    (not both ends in one question) matters: in one question a path-following engine puts the two query frames
    next to each other and attaches them by their closer end, which reverses them when the demonstration looks
    different (another scene, another colour).
    """
    order = implied_order(values)
    pairs = max(1, min(pairs, len(order) // 2))
    pool = [reference[0], reference[-1], *images]  # reference frames are pool indices 0 and 1
    question = ordering.build(3, description=description)
    margin, answers = 0.0, []
    for k in range(pairs):
        for sign, end in ((-1.0, order[k]), (1.0, order[-1 - k])):
            dist, ans = _ask_window(tpru, question, pool, _shown((0, 1, 2 + end), "orient"), mode)
            slots = slot_distribution(dist, 2 + end, [0, 1])
            margin += sign * sum(s * p for s, p in enumerate(slots))
            answers.append(ans)
    return (list(values) if margin >= 0 else [1.0 - v for v in values]), margin, answers


def estimate(tpru, images: Sequence, *, description: str | None = None, reference: Sequence | None = None,
             mode: str = "fast", method: str = "auto", started: float | None = None,
             prepare_s: float = 0.0) -> ProgressResult:
    """Progress of already-loaded frames (``TPRU.progress`` loads them and calls this).

    The result's ``settings`` and ``usage`` are ``tpru``'s (see :mod:`tpru_agent.calls`; usage counts the engine's
    tokens on this thread since the last public call began).

    Raises:
        ConfigError: an unknown ``method``, ``"reference"`` without a reference, or fewer than 2 frames.
    """
    started = calls.begin(tpru) if started is None else started
    if method not in METHODS:
        raise ConfigError(f"progress method must be one of {METHODS}, got {method!r}")
    if len(images) < 2:
        raise ConfigError(f"progress needs at least 2 frames, got {len(images)}")
    if method == "reference" and reference is None:
        raise ConfigError("method='reference' needs reference= (frames of a demonstration of the same task)")
    if mode == "reason":
        log.warning("progress asks one 4-frame question per window, each with a chain of thought in mode='reason'; "
                    "mode='fast' scores them instead (one pass each)")
    if method in ("anchored", "reference") and reference is None:
        raise ConfigError(f"method={method!r} needs reference= (frames of a demonstration of the same task)")
    if reference is not None and method == "reference":
        values, frame_conf, answers = _reference_values(tpru, images, reference, description, mode)
        chosen, alternatives, known = "reference", {}, True
        confidence = sum(frame_conf) / len(frame_conf)
    else:
        candidates, votes, answers, known = _window_values(tpru, images, description, mode)
        chosen = method if method in candidates else ("rank" if known else "seriation")
        values = candidates[chosen]
        alternatives = {k: tuple(v) for k, v in candidates.items() if k != chosen}
        if reference is not None:  # auto / anchored: the demonstration decides which end is the start
            values, _, extra = _orient_by_reference(tpru, images, reference, values, description, mode)
            alternatives[chosen] = tuple(candidates[chosen])
            chosen, known, answers = "anchored", True, answers + extra
        confidence, frame_conf = window_confidence(implied_order(values), votes)
    timings = calls.timings(started, prepare_s, answers)
    return ProgressResult(values=tuple(values), order=implied_order(values), confidence=confidence,
                          frame_confidence=tuple(frame_conf), direction_known=known, method=chosen,
                          passes=len(answers), alternatives=alternatives, raw="\n".join(a.raw for a in answers),
                          engine=tpru.engine_name, mode=mode, timings=timings, **calls.made(tpru, mode, method=chosen))


__all__ = ["METHODS", "anchor_indices", "direction_free", "estimate", "expected_rank", "expected_separation",
           "implied_order", "orient", "ranks", "rescale", "seriate", "slot_distribution", "slot_midpoints",
           "spearman", "voc", "window_confidence"]
