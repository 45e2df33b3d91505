"""Per-call plumbing of the facade: when a public call starts, its timings, and how its result was made.

Each public call of :class:`tpru_agent.TPRU` (``order_frames``, ``progress``, ``predict_next``,
``review_previous``, ``verify_step``, and ``ProcedureChecker.observe`` through it) starts with :func:`begin`, which
drops token usage left on the engine by earlier work on this thread, and ends with :func:`made`, which gives the
result's ``settings`` and ``usage`` (see :mod:`tpru_agent.results`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from tpru_agent.tasks.answer import Answer


def begin(tpru) -> float:
    """Start a public call: forget the engine's usage counted so far on this thread; the start time."""
    tpru.engine.take_usage()
    return time.perf_counter()


def timings(started: float, prepare_s: float, answers: Sequence[Answer]) -> dict[str, float]:
    """The answers' timings summed, ``prepare_s`` (frame loading) and ``total_s``.

    ``calls`` is the number of engine passes made (each answer records its own: debiased answers make several).
    """
    out = {"prepare_s": prepare_s, "calls": 0.0}
    for ans in answers:
        out["calls"] += 0.0 if "calls" in ans.timings else 1.0
        for key, value in ans.timings.items():
            out[key] = out.get(key, 0.0) + value
    out["total_s"] = time.perf_counter() - started
    return out


def settings(tpru, mode: str, **extra: Any) -> dict[str, Any]:
    """The options a call of ``tpru`` ran with: mode, decoding, debias, template, pixel budget, engine and model."""
    template = tpru.template
    options = tpru.options
    return {"mode": mode, "max_new_tokens": options.max_new_tokens, "temperature": options.temperature,
            "seed": options.seed, "debias": tpru.debias,
            "template": None if template is None else os.fspath(template),
            "budget": None if tpru.budget is None else tpru.budget.to_dict(), "engine": tpru.engine_name,
            "model": tpru.model_name, **extra}


def made(tpru, mode: str, **extra: Any) -> dict[str, dict]:
    """``settings`` and ``usage`` (the engine's tokens on this thread since :func:`begin`) for a result."""
    return {"settings": settings(tpru, mode, **extra), "usage": tpru.engine.take_usage().to_dict()}


__all__ = ["begin", "made", "settings", "timings"]
