"""ProcedureChecker: verify each new camera frame of a robot or GUI loop against the procedure so far.

Each :meth:`ProcedureChecker.observe` asks TPRU's Next-Frame Prediction question "given the last ``window``
accepted frames (and, with a reference demonstration, its final frame as the goal), is this observation the next
step, or none of the choices?" and turns P(observation) into a verdict with hysteresis: a single low-confidence
frame yields ``uncertain``; ``confirm`` consecutive ones yield ``rejected``. Frames with no visual change from the
last accepted frame are recognised without a model call. With a reference, each accepted frame is matched to the
nearest reference step at or after the current one (a visual distance, no model call), which gives ``progress``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpru_agent import calls
from tpru_agent import frames as _frames
from tpru_agent.errors import ConfigError, ParseError
from tpru_agent.results import CheckEvent, Status

#: Mean absolute difference (0..255, on a 32x32 grey thumbnail) under which two frames count as the same. Real
#: motion measured 0.3-3.8 between frames 4-8 simulator steps apart (Meta-World, 224 px); identical renders give 0.
#: Raise it for noisy cameras.
DUPLICATE_THRESHOLD = 0.2
#: The longest history one verify question takes (the facade's history limit).
MAX_WINDOW = 12
_NO_USAGE = {"prompt_tokens": 0, "image_tokens": 0, "generated_tokens": 0}


def thumbnail(image) -> np.ndarray:
    """A 32x32 grey float thumbnail: the cheap visual signature used for duplicates and reference matching."""
    return np.asarray(image.convert("L").resize((32, 32)), dtype=np.float32)


def same_frame(a, b, threshold: float = DUPLICATE_THRESHOLD) -> bool:
    """True when two images show no visual change (their thumbnails differ by less than ``threshold``)."""
    return float(np.abs(thumbnail(a) - thumbnail(b)).mean()) < threshold


@dataclass
class _State:
    accepted: list
    thumbs: list
    matched: int | None
    low_streak: int
    last_status: Status | None
    step: int
    events: list
    anchor: int = 0
    last_thumb: Any = None
    last_event: Any = None


class ProcedureChecker:
    """Stateful step verifier for a control loop (``observe(frame)`` per frame, ``reset()`` per episode).

    Args:
        model: a :class:`tpru_agent.TPRU` (any engine; ``TPRU("classic")`` needs no weights).
        reference: optional demonstration of the same procedure done right, in time order: a list of frames
            (used in the order given), a folder (its images in natural file-name order: ``frame_2`` before
            ``frame_10``; name them so, or pass a list), or a video (``reference_frames`` frames sampled evenly).
        description: the procedure in words ("open the drawer").
        window: the most accepted frames the question shows as history (TPRU trained with 2 + the goal). The
            history is anchored: it grows from an anchor frame up to ``window`` frames, then restarts from the
            last ``(window + 1) // 2`` frames, so consecutive calls share their prompt prefix (prefix cache).
        mode: ``"fast"`` (one scoring pass per frame) or ``"reason"`` (chain of thought; slow).
        threshold: P(ok) at or above which a frame is accepted.
        confirm: consecutive frames below the threshold before the verdict becomes ``rejected``.
        log_path: optional JSONL file; one event per line, appended as they happen.
        duplicate_threshold: grey-level difference under which a frame counts as unchanged (no model call).
        bgr: numpy frames come in OpenCV's BGR order (``cv2.VideoCapture``); they are converted to RGB.
        reference_frames: how many frames to take from a reference video (more give a finer ``progress``).

    Example:
        >>> checker = ProcedureChecker(TPRU("classic"), reference="demo/", description="open the drawer")  # doctest: +SKIP
        >>> for frame in camera:                                           # doctest: +SKIP
        ...     event = checker.observe(frame)
        ...     if event.status == "rejected": stop_robot()
    """

    def __init__(self, model, *, reference=None, description: str | None = None, window: int = 3,
                 mode: str = "fast", threshold: float = 0.5, confirm: int = 2,
                 log_path: str | os.PathLike | None = None, duplicate_threshold: float = DUPLICATE_THRESHOLD,
                 bgr: bool = False, reference_frames: int = 16):
        if not 1 <= window <= MAX_WINDOW:
            raise ConfigError(f"window must be 1..{MAX_WINDOW} accepted frames (one question holds at most "
                              f"{MAX_WINDOW} history frames), got {window}")
        if confirm < 1:
            raise ConfigError(f"confirm must be >= 1 frames, got {confirm}")
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold must be a probability in (0, 1), got {threshold}")
        if mode not in ("fast", "reason"):
            raise ConfigError(f"mode must be 'fast' or 'reason', got {mode!r}")
        self.model = model
        self.description = description
        self.window = window
        self.mode = mode
        self.threshold = threshold
        self.confirm = confirm
        self.duplicate_threshold = duplicate_threshold
        self.bgr = bgr
        budget = getattr(model, "budget", None)
        self.reference = [] if reference is None else _frames.load_frames(reference, budget=budget, bgr=bgr, min_frames=2,
                                                                 video_frames=reference_frames, what="reference")
        self._ref_thumbs = [thumbnail(f) for f in self.reference]
        self.log_path = Path(log_path) if log_path is not None else None
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Forget the episode (history, hysteresis, events); keep the model and the reference."""
        self.episode = getattr(self, "episode", -1) + 1  # numbers the episodes in the JSONL log
        self._s = _State([], [], None, 0, None, 0, [])

    @property
    def history(self) -> list:
        """The accepted frames so far, oldest first."""
        return list(self._s.accepted)

    @property
    def events(self) -> list[CheckEvent]:
        """Every event of this episode."""
        return list(self._s.events)

    def observe(self, frame) -> CheckEvent:
        """Check one new frame; returns a :class:`CheckEvent` (``status``, ``confidence``, ``progress``...)."""
        started = time.perf_counter()
        s = self._s
        # loaded once, at the model's budget and marked so: nothing under verify_step loads or resizes it again
        image = _frames.load_frame(frame, budget=getattr(self.model, "budget", None), bgr=self.bgr, index=s.step,
                           what="observation")
        thumb = thumbnail(image)
        if not s.accepted:
            event = self._first(image, thumb, started)
        elif self._same(thumb, s.thumbs[-1]):
            # Back at (or still at) the last accepted state: nothing new happened, so nothing is wrong.
            event = self._event(Status.ACCEPTED, 1.0, started, raw="", duplicate=True,
                                details={"reason": "no visual change since the last accepted frame"})
        elif s.last_thumb is not None and s.last_event is not None and self._same(thumb, s.last_thumb):
            # Still showing the frame judged just before: repeat that verdict without a model call.
            prev = s.last_event
            event = self._event(prev.status, prev.confidence, started, raw="", duplicate=True,
                                details={"reason": "no visual change since the previous frame", "of_step": prev.step})
        else:
            event = self._judge(image, thumb, started)
        s.last_thumb, s.last_event = thumb, event
        s.step += 1
        s.events.append(event)
        self._log(event)
        return event

    # ------------------------------------------------------------------ internals
    def _same(self, a, b) -> bool:
        return float(np.abs(a - b).mean()) < self.duplicate_threshold

    def _first(self, image, thumb, started: float) -> CheckEvent:
        self._accept(image, thumb)
        return self._event(Status.ACCEPTED, 1.0, started, raw="", details={"reason": "first frame starts the history"})

    def _judge(self, image, thumb, started: float) -> CheckEvent:
        s = self._s
        goal = self.reference[-1] if self.reference else None
        try:
            # the frames are already loaded at the model's budget: each is loaded once per observed frame
            verdict = self.model._verify(s.accepted[s.anchor:], image, [], goal, self.description, self.mode)
        except ParseError as exc:  # e.g. reasoning cut off at max_new_tokens: a doubt, not a crash of the loop
            s.low_streak += 1
            status = Status.REJECTED if s.low_streak >= self.confirm else Status.UNCERTAIN
            return self._event(status, 0.0, started, raw=exc.raw, details={"error": str(exc).split("; raw")[0]},
                               usage=self.model.engine.take_usage().to_dict())  # the failed call's tokens
        details = {"p_ok": verdict.confidence, "probabilities": verdict.choice.probabilities,
                   "letter": verdict.choice.letter}
        if verdict.duplicate:  # no change at the model's (default) threshold, though above this checker's one
            return self._event(Status.ACCEPTED, 1.0, started, raw=verdict.raw, engine=verdict.engine, duplicate=True,
                               details={**details, "reason": "no visual change since the last accepted frame"},
                               made=verdict)
        if verdict.confidence >= self.threshold:
            s.low_streak = 0
            self._accept(image, thumb)
            status = Status.ACCEPTED
        else:
            s.low_streak += 1
            status = Status.REJECTED if s.low_streak >= self.confirm else Status.UNCERTAIN
        return self._event(status, verdict.confidence, started, raw=verdict.raw, engine=verdict.engine,
                           details=details, lenient=verdict.lenient, made=verdict)

    def _accept(self, image, thumb) -> None:
        s = self._s
        s.accepted.append(image)
        s.thumbs.append(thumb)
        if len(s.accepted) - s.anchor > self.window:
            # Re-anchor in jumps rather than sliding by one: the history's first frames then stay the same for
            # several calls, so the engine's prefix cache reuses them (a sliding window changes the first image,
            # and with it the whole prompt, on every accepted frame).
            s.anchor = len(s.accepted) - max(1, (self.window + 1) // 2)
        if self._ref_thumbs:
            lo = 0 if s.matched is None else s.matched  # monotone: never back to an earlier reference step
            hi = len(self._ref_thumbs)
            dists = [float(np.abs(thumb - self._ref_thumbs[k]).mean()) for k in range(lo, hi)]
            s.matched = lo + int(np.argmin(dists))

    def _event(self, status: Status, confidence: float, started: float, *, raw: str, engine: str | None = None,
               duplicate: bool = False, details: dict | None = None, lenient: bool = False,
               made=None, usage: dict | None = None) -> CheckEvent:
        """The event; ``made``: the verdict of the model call behind it (its settings and usage), if any."""
        s = self._s
        s.last_status = status
        progress = None if s.matched is None else (s.matched + 1) / len(self.reference)
        return CheckEvent(step=s.step, status=status, confidence=float(confidence), matched_step=s.matched,
                          progress=progress, latency_s=time.perf_counter() - started, raw=raw,
                          engine=engine or getattr(self.model, "engine_name", "?"), duplicate=duplicate,
                          details=details or {}, lenient=lenient, settings=self._settings(made),
                          usage=dict(made.usage if made is not None else usage or _NO_USAGE))

    def _settings(self, verdict) -> dict[str, Any]:
        """The model call's settings (or, with no call, the model's in this checker's mode) and the checker's own."""
        own = {"threshold": self.threshold, "confirm": self.confirm, "window": self.window,
               "duplicate_threshold": self.duplicate_threshold}
        if verdict is not None:
            return {**verdict.settings, **own}
        try:
            return {**calls.settings(self.model, self.model.effective_mode(self.mode)), **own}  # the mode that runs
        except AttributeError:  # a model object without the facade's options
            return own

    def _log(self, event: CheckEvent) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"episode": self.episode, **event.to_dict()}, default=str) + "\n")
            fh.flush()

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        """Counts per status, model calls, mean / p95 latency of model calls, and where the procedure went wrong.

        ``first_rejected_step`` is the first frame whose verdict became ``rejected``; ``first_doubt_step`` the first
        frame of the low-confidence run that led there.
        """
        events = self._s.events
        counts = {st.value: sum(e.status == st for e in events) for st in Status}
        judged = [e for e in events if not e.duplicate and e.raw]
        latencies = np.array([e.latency_s for e in judged]) if judged else np.array([0.0])
        first_rej = next((e.step for e in events if e.status == Status.REJECTED), None)
        doubt = None
        if first_rej is not None:
            doubt = first_rej
            for e in reversed([e for e in events if e.step < first_rej and not e.duplicate]):
                if e.status != Status.UNCERTAIN:
                    break
                doubt = e.step
        return {"frames": len(events), "counts": counts, "duplicates": sum(e.duplicate for e in events),
                "model_calls": len(judged), "latency_mean_s": float(latencies.mean()),
                "latency_p95_s": float(np.percentile(latencies, 95)), "first_rejected_step": first_rej,
                "first_doubt_step": doubt, "accepted_frames": len(self._s.accepted),
                "progress": events[-1].progress if events else None}
