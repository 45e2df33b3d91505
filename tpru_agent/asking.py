"""One question, one answer: the engine passes behind :meth:`tpru_agent.TPRU.ask`, letter-position debiasing included.

``TPRU.ask`` (which ``tpru eval run`` calls), ``predict_next`` / ``review_previous`` (``tpru next``, ``tpru
previous``) and ``verify_step`` all answer through :func:`ask`, so ``debias=k`` means and costs the same for each:

- ``mode="reason"``, or ``k == 1``: one pass (a generation, then a scoring pass over the answers in reason mode).
- ``mode="fast"`` with ``k > 1`` on a candidates question: ``min(k, n)`` cyclic shifts of the ``n`` candidate
  images, each asked with the "None of the choices provided" option where the question puts it and again at the
  other end of the list (first when it is not first, else last), so the None letter moves too: ``2 * min(k, n)``
  scoring passes (``min(k, n)`` without a None option). Each letter's probability is mapped back to its candidate
  (or to None) and averaged over the passes. :func:`passes` gives the count; ``Answer.timings["calls"]`` records it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from tpru_agent.engines.base import Request
from tpru_agent.errors import ConfigError
from tpru_agent.tasks import continuation, parse_response, render_prompt
from tpru_agent.tasks.answer import Answer, softmax
from tpru_agent.tasks.question import IMAGE, NONE_TEXT, Option, Question


def moved_none(question: Question) -> Question | None:
    """``question`` with its "None" option at the other end of the list (first, or last when it was first).

    Only the option bodies move: the first candidate's ``<image>`` and the None text trade places, so the images
    keep their order. ``None`` when the question has no None option, options that are not candidate images, or
    a None text that cannot be told apart from the rest of the problem.

    Example:
        >>> from tpru_agent.tasks import next_frame
        >>> moved = moved_none(next_frame.build(2, 2))
        >>> moved.none_letter, moved.problem.splitlines()[-3:]
        ('A', ['A. None of the choices provided', 'B. <image>', 'C. <image>'])
    """
    values = [o.value for o in question.options]
    n = question.n_candidates
    if None not in values or n < 1 or n != len(values) - 1 or question.problem.count(NONE_TEXT) != 1:
        return None
    first = values[0] is None
    order = [v for v in values if v is not None] + [None] if first else [None] + [v for v in values if v is not None]
    options = tuple(Option(o.letter, v) for o, v in zip(question.options, order))
    # the None text trades places with a candidate's <image>: the last one (None moves last) or the first one
    text = question.problem
    images = [i for i in range(len(text)) if text.startswith(IMAGE, i)]
    swaps = sorted([(text.index(NONE_TEXT), len(NONE_TEXT), IMAGE),
                    (images[question.n_images - 1 if first else question.n_images - n], len(IMAGE), NONE_TEXT)])
    pieces, last = [], 0
    for start, length, replacement in swaps:
        pieces += [text[last:start], replacement]
        last = start + length
    problem = "".join(pieces) + text[last:]
    return dataclasses.replace(question, problem=problem, options=options, answer=None)


def passes(question: Question, mode: str, debias: int) -> int:
    """Engine passes :func:`ask` makes for ``question`` (see the module docstring)."""
    n = question.n_candidates
    if mode != "fast" or debias < 2 or n < 1:
        return 1
    return min(debias, n) * (2 if moved_none(question) is not None else 1)


def ask(tpru, question: Question, images: Sequence, *, mode: str, debias: int) -> Answer:
    """Answer ``question`` over loaded ``images`` with ``tpru``'s engine, debiased as the module docstring says.

    Raises:
        ConfigError: the image count differs from the question's.
        ParseError: ``mode="reason"`` and the generated text has no valid answer.
    """
    if len(images) != question.n_images:
        raise ConfigError(f"the question shows {question.n_images} images but {len(images)} were given")
    if passes(question, mode, debias) == 1:
        return ask_once(tpru, question, images, mode)
    n = question.n_candidates
    n_context = question.n_images - n
    layouts = [question] + [q for q in (moved_none(question),) if q is not None]
    letter_of = {o.value: o.letter for o in question.options}
    merged = {letter: 0.0 for letter in letter_of.values()}
    timings: dict[str, float] = {}
    total = min(debias, n) * len(layouts)
    for shown_question in layouts:
        for s in range(min(debias, n)):
            rotated = [(k + s) % n for k in range(n)]  # shown candidate k is original candidate rotated[k]
            shown = list(images[:n_context]) + [images[n_context + i] for i in rotated]
            ans = ask_once(tpru, shown_question, shown, mode)
            for letter, p in ans.probabilities.items():
                value = shown_question.option(letter).value
                merged[letter_of[None if value is None else rotated[value]]] += p / total
            for key, value in ans.timings.items():
                timings[key] = timings.get(key, 0.0) + value
    best = max(merged, key=merged.get)
    return Answer(best, merged, continuation(best), timings)


def ask_once(tpru, question: Question, images: Sequence, mode: str) -> Answer:
    """One pass: in reason mode generate, parse, then score every answer after the reasoning; in fast mode score."""
    engine = tpru.engine
    request = Request(question, render_prompt(question.problem, tpru.template), tuple(images))
    answers = question.answers()
    timings: dict[str, float] = {"calls": 1.0}
    raw, prefix, chosen, lenient = "", "", None, False
    if mode == "reason":
        t0 = time.perf_counter()
        raw = engine.generate([request], tpru.options)[0]
        timings["generate_s"] = time.perf_counter() - t0
        parsed = parse_response(raw, question.validate)
        chosen, prefix, lenient = parsed.answer, parsed.prefix, not parsed.well_formed
    t0 = time.perf_counter()
    scores = engine.score(request, [continuation(a) for a in answers], prefix=prefix)
    timings["score_s"] = time.perf_counter() - t0
    probs = softmax(dict(zip(answers, scores)))
    if chosen is None:
        chosen = max(probs, key=probs.get)
        raw = continuation(chosen)
    return Answer(chosen, probs, raw, timings, lenient)


__all__ = ["ask", "ask_once", "moved_none", "passes"]
