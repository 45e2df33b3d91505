"""``TPRU.order_frames`` over more than 4 frames: covering windows (model engines) or the classic shortest path.

Both take frames already loaded at the model's budget and return an :class:`~tpru_agent.results.OrderResult`
whose ``answer`` labels the final order (A = input 0, B = input 1, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Sequence

from tpru_agent import calls, pairwise
from tpru_agent.errors import ParseError
from tpru_agent.results import OrderResult
from tpru_agent.tasks import ordering
from tpru_agent.tasks.answer import Answer
from tpru_agent.tasks.question import MAX_ORDER_LABELS

log = logging.getLogger(__name__)


def labels(order: Sequence[int]) -> str:
    """Labels of an order of input indices: A = input 0, B = input 1, ... (``[26]`` beyond Z)."""
    return "".join(chr(ord("A") + i) if i < 26 else f"[{i}]" for i in order)


def order_classic(tpru, engine, images: list, started: float, prepare_s: float) -> OrderResult:
    """The classic engine's shortest path over all the frames (its windows would all answer 0.5: issue 14)."""
    t0 = time.perf_counter()
    path = engine.order(images)
    timings = {"prepare_s": prepare_s, "path_s": time.perf_counter() - t0}
    timings["total_s"] = time.perf_counter() - started
    return OrderResult(path.order, labels(path.order), path.confidence, {}, path.explanation, tpru.engine_name,
                       "fast", timings, direction_known=False, **calls.made(tpru, "fast"))


def order_windows(tpru, images: list, description: str | None, mode: str, started: float,
                  prepare_s: float) -> OrderResult:
    """5..64 loaded frames ordered through 4-frame covering windows whose pairwise preferences are aggregated.

    The confidence is the geometric mean, over windows, of the window's probability of the final order restricted
    to it; a window whose reasoning cannot be parsed is scored instead (``scored_after_parse_error``).
    """
    n = len(images)
    windows = pairwise.covering_windows(n, MAX_ORDER_LABELS)
    if mode == "reason":
        log.warning("ordering %d frames asks %d 4-frame questions, each with a chain of thought; mode='fast' "
                    "scores them instead (one pass each)", n, len(windows))
    question = ordering.build(MAX_ORDER_LABELS, description=description)
    answered: list[tuple[tuple[int, ...], dict[tuple[int, ...], float], Answer]] = []
    fell_back: set[tuple[int, ...]] = set()
    for window in windows:
        shown = [images[i] for i in window]
        tried = time.perf_counter()
        try:
            ans = tpru.ask(question, shown, mode=mode)
        except ParseError as exc:  # one unparsable window must not discard all the others: score it instead
            fell_back.add(window)
            log.warning("window %s: %s; using its fast-mode scores", window, str(exc).split("; raw")[0])
            failed_s = time.perf_counter() - tried
            ans = tpru.ask(question, shown, mode="fast")
            # the failed reasoning pass counts too: in usage (the engine counted it) and so in calls and time
            timings = dict(ans.timings)
            timings["calls"] = timings.get("calls", 1.0) + 1.0
            timings["generate_s"] = timings.get("generate_s", 0.0) + failed_s
            ans = dataclasses.replace(ans, timings=timings)
        dist = {tuple(window[question.labels.index(c)] for c in perm): p for perm, p in ans.probabilities.items()}
        answered.append((window, dist, ans))
    pref = pairwise.pairwise_preferences(n, [(w, d) for w, d, _ in answered])
    order = pairwise.best_order(pref)
    rank = {frame: pos for pos, frame in enumerate(order)}
    details, log_conf = [], 0.0
    for window, dist, ans in answered:
        restricted = tuple(sorted(window, key=rank.get))
        p = max(dist.get(restricted, 0.0), 1e-12)
        log_conf += math.log(p)
        details.append({"indices": list(window), "answer": ans.answer, "confidence": ans.confidence,
                        "agrees": dist.get(restricted, 0.0) == max(dist.values()), "raw": ans.raw,
                        "scored_after_parse_error": window in fell_back})
    reverse_tied = math.isclose(pairwise.agreement(order, pref), pairwise.agreement(order[::-1], pref),
                                rel_tol=1e-9)
    return OrderResult(order, labels(order), math.exp(log_conf / len(answered)), {},
                       "\n".join(d["raw"] for d in details), tpru.engine_name, mode,
                       calls.timings(started, prepare_s, [a for _, _, a in answered]), windows=tuple(details),
                       direction_known=not reverse_tied, lenient=any(a.lenient for _, _, a in answered),
                       **calls.made(tpru, mode))


__all__ = ["labels", "order_classic", "order_windows"]
