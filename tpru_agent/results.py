"""Frozen result types. Each keeps the raw model text, the engine, the mode and timings, and has ``to_dict()``.

Every result also records how it was made, as ultralytics' ``Results.speed`` or faster-whisper's
``TranscriptionInfo`` do: ``settings`` (the options the call ran with: ``mode``, ``max_new_tokens``,
``temperature``, ``seed``, ``debias``, ``template``, ``budget`` (``min_pixels`` / ``max_pixels`` / ``factor``, or
``None`` for original sizes), ``engine`` and ``model``) and ``usage`` (the tokens the engine processed for the call:
``prompt_tokens``, ``image_tokens``, ``generated_tokens``; zeros for the classic engine and custom engines). Both
are plain dicts, so ``to_dict()`` (and ``--json`` on the command line) shows them. ``ChoiceResult.options`` was
taken already (option letter -> candidate index), hence the name ``settings``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _ToDict:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return _plain(self)


@dataclass(frozen=True)
class OrderResult(_ToDict):
    """Temporal order of the input frames.

    Attributes:
        order: input indices in temporal order (``order[0]`` is the first frame in time).
        answer: the label permutation the model gave (``"CABD"``) for single-question calls; for windowed
            calls over more than 4 frames, the labels of the final order (A = input 0, B = input 1, ...).
        confidence: probability of ``order`` under the model (see ``TPRU.order_frames`` for windows).
        probabilities: probability of each scored permutation (single question), best first, top 24 kept.
        windows: for more than 4 frames, each window's input indices, its order and its confidence.
        direction_known: False when the order and its reverse were exactly as likely (always with the classic
            engine): the direction is then a guess (the end shown earlier among the inputs comes first).
        lenient: the model's generated answer was read by a lenient parse, not the strict trained format
            (missing tags, quotes, ``C-A-B-D``, ``(B)``, an answer inside the reasoning...): read ``raw``.
        settings: the options the call ran with (see the module docstring).
        usage: tokens the engine processed for the call (see the module docstring).
    """

    order: tuple[int, ...]
    answer: str
    confidence: float
    probabilities: dict[str, float]
    raw: str
    engine: str
    mode: str
    timings: dict[str, float]
    windows: tuple[dict, ...] = ()
    direction_known: bool = True
    lenient: bool = False
    settings: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChoiceResult(_ToDict):
    """Answer to a next-frame or previous-frame question.

    Attributes:
        index: index into the caller's candidates, or ``None`` when the model chose "None of the choices".
        letter: the option letter the model answered.
        confidence: probability of that option (softmax over the options' scores).
        probabilities: each option letter's probability.
        options: option letter -> candidate index (``None`` for the "None" option).
        lenient: the model's generated answer was read by a lenient parse, not the strict trained format
            (missing tags, quotes, ``C-A-B-D``, ``(B)``, an answer inside the reasoning...): read ``raw``.
        settings: the options the call ran with (see the module docstring).
        usage: tokens the engine processed for the call (see the module docstring).
    """

    index: int | None
    letter: str
    confidence: float
    probabilities: dict[str, float]
    options: dict[str, int | None]
    raw: str
    engine: str
    mode: str
    timings: dict[str, float]
    lenient: bool = False
    settings: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepVerdict(_ToDict):
    """Whether an observation is a valid next step.

    Attributes:
        ok: the model picked the observation as the next step (rather than "None" or a distractor), with more
            probability than any other option (a tie is not ok), and the observation is not a duplicate.
        confidence: probability that the observation is the next step, P(ok).
        choice: the underlying multiple-choice result.
        duplicate: the observation shows no visual change from the last history frame: no progress, so ``ok``
            is False whatever the model said.
        lenient: the model's generated answer was read by a lenient parse, not the strict trained format
            (missing tags, quotes, ``C-A-B-D``, ``(B)``, an answer inside the reasoning...): read ``raw``.
        settings, usage: as :class:`ChoiceResult`'s (the same call).
    """

    ok: bool
    confidence: float
    choice: ChoiceResult
    raw: str
    engine: str
    mode: str
    timings: dict[str, float]
    lenient: bool = False
    duplicate: bool = False
    settings: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ProgressResult(_ToDict):
    """Task progress of each input frame (``TPRU.progress``).

    Attributes:
        values: one progress value in [0, 1] per input frame, in input order (0 = start, 1 = done).
        order: input indices sorted by progress (the implied temporal order).
        confidence: how sure the model is of that order (window methods: geometric mean over the windows of the
            probability of the order restricted to each; ``"reference"``: mean of ``frame_confidence``).
        frame_confidence: per input frame: mean probability of the implied order over the windows holding it, or
            (``"reference"``) the probability of the most likely slot among the reference frames.
        direction_known: False when the engine has no sense of direction (the classic engine without a
            reference): the values are then mirrored or not by a guess from the input order.
        method: ``"rank"``, ``"seriation"`` or ``"reference"`` (see :mod:`tpru_agent.progress`).
        passes: questions asked (one scoring pass each in fast mode).
        alternatives: the other methods' values from the same passes, by method name.
        settings: the options the call ran with (see the module docstring).
        usage: tokens the engine processed for the call (see the module docstring).
    """

    values: tuple[float, ...]
    order: tuple[int, ...]
    confidence: float
    frame_confidence: tuple[float, ...]
    direction_known: bool
    method: str
    passes: int
    alternatives: dict[str, tuple[float, ...]]
    raw: str
    engine: str
    mode: str
    timings: dict[str, float]
    settings: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)


class Status(str, enum.Enum):
    """Verdict of a ProcedureChecker event."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    UNCERTAIN = "uncertain"


@dataclass(frozen=True)
class CheckEvent(_ToDict):
    """One ``ProcedureChecker.observe`` outcome (``lenient``: as :class:`StepVerdict`'s, for the judged frame).

    ``settings`` are the options of the model call (the checker's own ``threshold``, ``confirm``, ``window`` and
    ``duplicate_threshold`` added); ``usage`` the tokens it processed (zeros when the frame needed no model call).
    """

    step: int
    status: Status
    confidence: float
    matched_step: int | None
    progress: float | None
    latency_s: float
    raw: str
    engine: str
    duplicate: bool = False
    details: dict = field(default_factory=dict)
    lenient: bool = False
    settings: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
