"""The ``tpru_question`` chat extension: the structured question rebuilt from JSON and checked before any engine
sees it, so a malformed one is a 400 that says what is wrong (never an engine crash, a 500).

Example:
    >>> q = build_question({"task": "ordering", "n_images": 2, "labels": ["A", "B"]}, "Order: <image><image>", 2)
    >>> q.answers()
    ('AB', 'BA')
"""

from __future__ import annotations

from tpru_agent.serve.errors import ClientError
from tpru_agent.tasks.question import LETTERS, MAX_CANDIDATES, MAX_ORDER_LABELS, TASKS, Option, Question

_KEYS = {"task", "problem", "n_images", "labels", "options", "context_steps", "target_step", "description"}


def _fail(message: str) -> ClientError:
    return ClientError(400, f"tpru_question is malformed: {message}", param="tpru_question",
                       code="invalid_tpru_question")


def build_question(spec: dict | None, text: str, n_images: int) -> Question:
    """The structured question the client sent (``tpru_question``), or a plain one around the chat text.

    Raises:
        ClientError: unknown keys, wrong types, or a question whose parts disagree (see :func:`check_question`).
    """
    if spec is None:
        return Question(task="chat", problem=text, n_images=n_images, labels=())
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise _fail(f"unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    try:
        raw_options = spec.get("options") or []
        options = tuple(Option(_letter(item[0]), _value(item[1])) for item in raw_options)
        if any(len(item) != 2 for item in raw_options):
            raise ValueError("each option is [letter, value]")
        question = Question(
            task=str(spec["task"]), problem=str(spec.get("problem", text)), n_images=_int(spec["n_images"]),
            labels=tuple(str(x) for x in spec.get("labels") or []), options=options,
            context_steps=tuple(_int(x) for x in spec.get("context_steps") or []),
            target_step=None if spec.get("target_step") is None else _int(spec["target_step"]),
            description=None if spec.get("description") is None else str(spec["description"]))
    except KeyError as exc:
        raise _fail(f"missing key {exc}") from exc
    except (TypeError, ValueError, IndexError) as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from exc
    check_question(question, n_images)
    return question


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _letter(value) -> str:
    if not isinstance(value, str) or len(value) != 1 or value not in LETTERS:
        raise ValueError(f"option letters are one of {LETTERS}, got {value!r}")
    return value


def _value(value):
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"an option value is a candidate index, a permutation string or null, got {value!r}")


def check_question(q: Question, n_images: int) -> None:
    """Refuse a question whose task, labels, options, steps and image count do not fit together."""
    if q.task not in TASKS:
        raise _fail(f"task {q.task!r} is not one of {TASKS}")
    if q.n_images != n_images:
        raise _fail(f"it describes {q.n_images} images but the message has {n_images}")
    letters = [o.letter for o in q.options]
    if len(set(letters)) != len(letters):
        raise _fail(f"repeated option letters {letters}")
    if q.task == "ordering":
        if not 2 <= n_images <= MAX_ORDER_LABELS or len(q.labels) != n_images or len(set(q.labels)) != n_images:
            raise _fail(f"an ordering question needs 2..{MAX_ORDER_LABELS} images and one distinct label per image "
                        f"(got {n_images} images, labels {list(q.labels)})")
        if q.options:
            raise _fail("an ordering question has no options (its answers are permutations of the labels)")
    elif q.task == "ordering_mcq":
        _check_order_mcq(q, n_images)
    else:
        _check_choice(q, n_images)


def _check_order_mcq(q: Question, n_images: int) -> None:
    frames = LETTERS[:n_images]
    if not 2 <= n_images <= MAX_ORDER_LABELS or not q.options:
        raise _fail(f"an ordering_mcq question needs 2..{MAX_ORDER_LABELS} images and options")
    for o in q.options:
        if o.value is not None and (not isinstance(o.value, str) or sorted(o.value) != sorted(frames)):
            raise _fail(f"option {o.letter} must be a permutation of {frames} or null, got {o.value!r}")
    if sum(o.value is None for o in q.options) > 1:
        raise _fail("at most one null ('None of the choices') option")


def _check_choice(q: Question, n_images: int) -> None:
    steps = q.context_steps
    if not steps or len(set(steps)) != len(steps) or q.target_step is None or q.target_step in steps:
        raise _fail(f"a {q.task} question needs distinct context_steps and a target_step that is not one of "
                    f"them (got {list(steps)} and {q.target_step})")
    cands = [o.value for o in q.options if o.value is not None]
    if not q.options or len(q.options) > MAX_CANDIDATES + 1 or any(not isinstance(v, int) for v in cands):
        raise _fail(f"a {q.task} question needs 1..{MAX_CANDIDATES + 1} options, each a candidate index or null")
    if sorted(cands) != list(range(len(cands))) or len(q.options) - len(cands) > 1:
        raise _fail(f"candidate indices must be 0..{len(cands) - 1}, each once, plus at most one null option")
    if len(steps) + len(cands) != n_images:
        raise _fail(f"{len(steps)} context images + {len(cands)} candidates make {len(steps) + len(cands)} "
                    f"images, but the message has {n_images}")


__all__ = ["build_question", "check_question"]
