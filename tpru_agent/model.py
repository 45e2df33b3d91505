"""The facade: ``TPRU(model).order_frames / predict_next / review_previous / verify_step``.

Every call runs one pipeline: validate and load frames (once per call; a frame already sized is never resized
again, :func:`tpru_agent.sizing.is_served`) -> build the task
question -> engine (generate and/or score, :mod:`tpru_agent.asking`) -> parse -> a typed result carrying the raw
text, confidence, engine, mode, timings and how it was made (``settings``, token ``usage``: :mod:`tpru_agent.calls`).
Ordering more than 4 frames lives in :mod:`tpru_agent.windowed`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Sequence

from tpru_agent import asking, calls, windowed
from tpru_agent import frames as _frames
from tpru_agent.engines.base import Engine, GenerationOptions, as_engine
from tpru_agent.errors import ConfigError
from tpru_agent.hub import DEFAULT_MODEL, resolve
from tpru_agent.progress import estimate as estimate_progress
from tpru_agent.results import ChoiceResult, OrderResult, ProgressResult, StepVerdict
from tpru_agent.sizing import TPRU_BUDGET, PixelBudget
from tpru_agent.tasks import next_frame, ordering, previous, render_prompt
from tpru_agent.tasks.answer import Answer, softmax
from tpru_agent.tasks.question import MAX_CANDIDATES, MAX_ORDER_LABELS, Question

log = logging.getLogger(__name__)

MODES = ("reason", "fast")
#: The most frames ``order_frames`` accepts (more than 4 are ordered through covering windows).
MAX_ORDER_FRAMES = 64


def _is_classic(model, engine) -> bool:
    if isinstance(engine, str):
        return engine == "classic" or (engine == "auto" and str(model).strip().lower() == "classic")
    return getattr(engine, "name", "") == "classic"


def _onnx_runtime_installed() -> bool:
    """onnxruntime and tokenizers import here (the bare install's runtime for packaged models)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "tokenizers"))


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}: 'reason' generates a chain of thought as "
                          "TPRU was trained, 'fast' answers by scoring the options in one pass")
    return mode


class TPRU:
    """A TPRU model (or the classic baseline) behind four task calls.

    Args:
        model: a name (``"tpru-3b"``, ``"tpru-7b"``, ``"tpru-32b"``, ``"qwen2.5-vl-3b"``..., or ``"tpru-nano"``,
            shipped inside the package), a Hub id, a local
            folder (transformers layout, or an ONNX export), or ``"classic"`` for the no-weights baseline.
        engine: ``"auto"`` (classic for ``"classic"``, onnx for an ONNX export folder and for ``"tpru-nano"`` when
            onnxruntime is installed, else hf), ``"hf"``,
            ``"onnx"``, ``"openai"``, ``"classic"``, or an object implementing the engine protocol.
        quantization: ``None``, ``"4bit"`` or ``"8bit"`` (bitsandbytes; hf engine).
        device: ``"auto"`` (cuda > mps > cpu), or a torch device string.
        dtype: ``"auto"`` (bf16 on GPU, fp32 on CPU), ``"bfloat16"``, ``"float16"``, ``"float32"``.
        template: a Jinja preamble file (uses ``{{ content }}``) instead of the built-in answer rules.
        budget: pixel budget frames are resized to; ``"auto"``: the model folder's own budget when it records one
            (``tpru_budget.json``, hf and onnx engines), else TPRU's training range (16,384..36,864 pixels per
            frame) for model engines, original size for the classic engine (which downsamples on its own).
        max_new_tokens: reasoning budget of ``mode="reason"``.
        debias: in fast mode, average each candidates answer over ``min(debias, n)`` cyclic shifts of the ``n``
            candidates, each with the "None" option where the question puts it and at the other end (counters
            letter position bias; costs ``2 * min(debias, n)`` scoring passes when ``debias > 1``, so 2 for
            ``verify_step``'s single candidate; see :mod:`tpru_agent.asking`). The same for every call: ``ask``
            (``tpru eval run``), ``predict_next`` / ``review_previous`` (``tpru next``) and ``verify_step``.
        bgr: numpy frames come in OpenCV's BGR order (``cv2.imread`` / ``VideoCapture``); converted to RGB.
        **engine_kwargs: passed to the engine (e.g. ``base_url=`` for openai, ``attn_implementation=`` for hf).

    Example:
        >>> model = TPRU("tpru-3b")                                         # doctest: +SKIP
        >>> model.order_frames(["c.png", "a.png", "b.png", "d.png"]).order  # doctest: +SKIP
        (1, 2, 0, 3)
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, engine: str | Engine = "auto",
                 quantization: str | None = None, device: str = "auto", dtype: str = "auto",
                 template: str | os.PathLike | None = None, budget: PixelBudget | None | str = "auto",
                 max_new_tokens: int = 1024, temperature: float = 0.0, seed: int | None = None, debias: int = 1,
                 bgr: bool = False, **engine_kwargs: Any):
        if debias < 1:
            raise ConfigError(f"debias must be >= 1 (number of option shifts to average), got {debias}")
        if not (budget is None or isinstance(budget, PixelBudget) or (isinstance(budget, str) and budget == "auto")):
            raise ConfigError(f"budget must be a tpru_agent.sizing.PixelBudget, None (frames at their own size) or "
                              f"'auto', got {budget!r}")
        self.model_name = str(model)
        self.template = template
        if template is not None:
            render_prompt("", template)  # fail now, not at the first call
        self._explicit_budget = budget != "auto"
        self.budget = budget if self._explicit_budget else (None if _is_classic(model, engine) else TPRU_BUDGET)
        self.debias = debias
        self.bgr = bgr
        self.options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        started = time.perf_counter()
        if isinstance(engine, str):
            self.engine = self._create(engine, quantization=quantization, device=device, dtype=dtype,
                                       **engine_kwargs)
            if self.engine.name == "classic":  # no weights ran: results must not name a model that did not
                self.model_name = "classic"
        else:  # a custom engine: anything with generate() and score(), held to the whole contract
            self.engine = as_engine(engine)
            self.model_name = f"<{self.engine.name} engine>"
        if not self._explicit_budget and self.budget is not None:  # a folder's own training budget wins (nano)
            self.budget = self.engine.budget or self.budget
        self.load_s = time.perf_counter() - started

    def _create(self, engine: str, **kwargs: Any) -> Engine:
        from tpru_agent.engines import create_engine

        kind, target = engine, self.model_name
        if engine in ("auto", "hf", "onnx"):
            ref = resolve(self.model_name)  # a packaged model that is not shipped fails here, with the fix
            if engine == "auto":
                kind = "classic" if ref.kind == "classic" else "onnx" if ref.is_onnx or (
                    ref.packaged and ref.onnx_folder is not None and _onnx_runtime_installed()) else "hf"
            if ref.packaged:  # the hf folder, or the ONNX export beside it
                target = str(ref.onnx_folder or ref.target) if kind == "onnx" else ref.target
        if isinstance(self.budget, PixelBudget) and self._explicit_budget:  # every engine hears an explicit budget
            kwargs.setdefault("min_pixels", self.budget.min_pixels)
            kwargs.setdefault("max_pixels", self.budget.max_pixels)
        # every engine takes the same options and refuses the ones it cannot honour (quantization on onnx...)
        return create_engine(kind, None if kind == "classic" else target, **kwargs)

    @property
    def engine_name(self) -> str:
        return self.engine.name

    def _classic(self):
        """The classic engine when it runs this model (it has no chain of thought and no sense of direction)."""
        from tpru_agent.engines.classic import ClassicEngine

        return self.engine if isinstance(self.engine, ClassicEngine) else None

    def effective_mode(self, mode: str) -> str:
        """The mode that actually runs for ``mode``: the classic engine only scores (its "generation" explains the
        same scores), so its results say ``"fast"`` and carry no generation time.

        Raises:
            ConfigError: ``mode`` is neither ``"reason"`` nor ``"fast"``.
        """
        return "fast" if _check_mode(mode) == "reason" and self._classic() is not None else mode

    # ---------------------------------------------------------------- the core: one question, one answer
    def ask(self, question: Question, images: Sequence, *, mode: str = "reason", debias: int | None = None) -> Answer:
        """Answer one rendered question over already-loaded images (the primitive every task call uses).

        ``mode="fast"`` scores every valid answer in one pass; ``mode="reason"`` generates, parses, then scores
        every valid answer after the generated reasoning so the result still has a probability. ``debias``
        (default: the constructor's) applies to fast-mode candidates questions: ``min(debias, n)`` cyclic shifts of
        the ``n`` candidate images, each asked with the "None" option where the question puts it and at the other
        end, every letter's probability mapped back to its candidate and averaged: ``2 * min(debias, n)`` scoring
        passes (``min(debias, n)`` without a None option), the same as ``predict_next`` / ``review_previous`` /
        ``verify_step`` make. ``timings["calls"]`` counts the passes (see :mod:`tpru_agent.asking`).

        Raises:
            ConfigError: the image count differs from the question's, or ``debias < 1``.
            ParseError: the generated text has no valid answer (the raw text is kept on the error).
        """
        debias = self.debias if debias is None else debias
        if debias < 1:
            raise ConfigError(f"debias must be >= 1 (number of option shifts to average), got {debias}")
        return asking.ask(self, question, images, mode=self.effective_mode(mode), debias=debias)

    # ---------------------------------------------------------------- ordering
    def order_frames(self, frames, *, description: str | None = None, mode: str = "reason") -> OrderResult:
        """Put frames in temporal order.

        Up to 4 frames are one TPRU question. 5..64 frames are ordered through 4-frame covering windows whose
        pairwise preferences are aggregated (see :mod:`tpru_agent.pairwise`); the confidence is then the geometric
        mean, over windows, of the window's probability of the final order restricted to it. The classic engine
        orders more than 4 frames by its own shortest path instead (:meth:`ClassicEngine.order`).

        ``direction_known`` is False when the order and its reverse were exactly as likely (always with the
        classic engine): the direction is then a tie broken by a rule (the end shown earlier among the inputs
        comes first), a guess, and the confidence is at most one half.

        Args:
            frames: paths, a glob, a folder, a video (4 frames sampled), PIL images or arrays; 2..64 frames.
            description: the procedure in words ("making coffee"); optional.
            mode: ``"reason"`` or ``"fast"``.

        Example:
            >>> TPRU("classic").order_frames("examples/frames").order   # doctest: +SKIP
        """
        started, mode = calls.begin(self), self.effective_mode(mode)
        images = self._load(frames, min_frames=2, max_frames=MAX_ORDER_FRAMES, what="frames")
        prepare_s = time.perf_counter() - started
        if len(images) <= MAX_ORDER_LABELS:
            ans = self.ask(ordering.build(len(images), description=description), images, mode=mode)
            labels = ordering.build(len(images)).labels
            order = tuple(labels.index(label) for label in ans.answer)
            probs = dict(sorted(ans.probabilities.items(), key=lambda kv: -kv[1])[:24])
            tied = math.isclose(ans.probabilities.get(ans.answer[::-1], -1.0), ans.confidence, rel_tol=1e-9)
            return OrderResult(order, ans.answer, ans.confidence, probs, ans.raw, self.engine_name, mode,
                               calls.timings(started, prepare_s, [ans]), direction_known=not tied,
                               lenient=ans.lenient, **calls.made(self, mode))
        if self._classic() is not None:
            return windowed.order_classic(self, self._classic(), images, started, prepare_s)
        return windowed.order_windows(self, images, description, mode, started, prepare_s)

    # ---------------------------------------------------------------- progress
    def progress(self, frames, *, description: str | None = None, reference=None, mode: str = "fast",
                 method: str = "auto", video_frames: int = 16) -> ProgressResult:
        """Task progress in [0, 1] of each frame, from the model's temporal preferences (frames in any order).

        Costs the covering windows' passes (20 for 16 frames; see :mod:`tpru_agent.progress`), or one pass per
        frame with a ``reference`` demonstration (which also fixes the direction for the classic engine).

        Args:
            frames: 2..64 frames (paths, a glob, a folder, a video: ``video_frames`` sampled, PIL images, arrays).
            description: the procedure in words; optional.
            reference: frames of a demonstration of the same task, in time order (anchors the values).
            mode: ``"fast"`` (score each window) or ``"reason"``.
            method: ``"auto"``, ``"rank"``, ``"seriation"`` or ``"reference"``.

        Example:
            >>> TPRU("classic").progress("episode.mp4").values   # doctest: +SKIP
        """
        started = calls.begin(self)
        images = self._load(frames, video_frames=video_frames, min_frames=2, max_frames=MAX_ORDER_FRAMES,
                            what="frames")
        ref = None if reference is None else self._load(reference, video_frames=video_frames, min_frames=2,
                                                        what="reference")
        return estimate_progress(self, images, description=description, reference=ref, mode=_check_mode(mode),
                                 method=method, started=started, prepare_s=time.perf_counter() - started)

    # ---------------------------------------------------------------- multiple choice
    def predict_next(self, history, candidates, *, goal=None, description: str | None = None,
                     mode: str = "reason", none_position: int | None = -1) -> ChoiceResult:
        """Which candidate frame comes right after ``history`` (optionally knowing the final ``goal`` frame)?

        TPRU's form is 2 history frames + the goal + 4 candidates; other counts work but leave the trained range.
        Costs one pass, or in fast mode with ``debias > 1`` the scoring passes :meth:`ask` describes.

        Returns:
            ChoiceResult whose ``index`` points into ``candidates``, or is ``None`` when the model answered
            "None of the choices provided".
        """
        started, mode = calls.begin(self), self.effective_mode(mode)
        hist = self._load(history, min_frames=1, max_frames=12, what="history")
        cands = self._load(candidates, min_frames=1, max_frames=MAX_CANDIDATES, what="candidates")
        goal = None if goal is None else self._load(goal, single=True, what="goal")
        return self._next(hist, cands, goal, description, mode, none_position, started)

    def _next(self, hist: list, cands: list, goal, description: str | None, mode: str, none_position: int | None,
              started: float) -> ChoiceResult:
        """``predict_next`` on frames already loaded at this model's budget."""
        question = next_frame.build(len(hist), len(cands), with_goal=goal is not None, none_position=none_position,
                                    description=description)
        context = hist + ([goal] if goal is not None else [])
        return self._choose(question, context, cands, mode, started, time.perf_counter() - started)

    def review_previous(self, later_frames, candidates, *, description: str | None = None, mode: str = "reason",
                        none_position: int | None = -1) -> ChoiceResult:
        """Which candidate frame comes right before ``later_frames`` (TPRU: steps 2-4 given, pick step 1)?

        Costs one pass, or in fast mode with ``debias > 1`` the scoring passes :meth:`ask` describes.
        """
        started, mode = calls.begin(self), self.effective_mode(mode)
        later = self._load(later_frames, min_frames=1, max_frames=12, what="later_frames")
        cands = self._load(candidates, min_frames=1, max_frames=MAX_CANDIDATES, what="candidates")
        question = previous.build(len(later), len(cands), none_position=none_position, description=description)
        return self._choose(question, later, cands, mode, started, time.perf_counter() - started)

    def verify_step(self, history, observation, *, description: str | None = None, goal=None, distractors=None,
                    mode: str = "reason") -> StepVerdict:
        """Is ``observation`` a valid next step after ``history``?

        Asks TPRU's Next-Frame Prediction question with the observation as option A (plus optional
        ``distractors`` as further candidates) and the "None of the choices provided" option last.
        ``ok`` is True when the model picks the observation and gives it more probability than any other option (a
        tie is not a yes); ``confidence`` is the probability the model gives the observation's option, P(ok). An
        observation with no visual change from the last history frame is no progress: ``ok`` is False and
        ``duplicate`` True whatever the model says (the checker treats it the same way; issue 14). With a
        ``description``, a frame that contradicts the text should be answered "None" (TPRU's negative samples
        train exactly this cross-check). Each frame is loaded once. Costs one pass, or in fast mode with
        ``debias > 1`` the scoring passes :meth:`ask` describes (2 without distractors).
        """
        started, mode = calls.begin(self), self.effective_mode(mode)
        hist = self._load(history, min_frames=1, max_frames=12, what="history")
        extra = [] if distractors is None else self._load(distractors, min_frames=0, max_frames=MAX_CANDIDATES - 1,
                                                          what="distractors")
        obs = self._load(observation, single=True, what="observation")
        goal = None if goal is None else self._load(goal, single=True, what="goal")
        return self._verify(hist, obs, extra, goal, description, mode, started)

    def _verify(self, hist: list, obs, extra: list, goal, description: str | None, mode: str,
                started: float | None = None) -> StepVerdict:
        """``verify_step`` on frames already loaded at this model's budget (the checker's path: each frame is
        loaded once per call, by :meth:`_load` or the checker)."""
        from tpru_agent.checker import same_frame

        started = calls.begin(self) if started is None else started
        mode = self.effective_mode(mode)
        choice = self._next(hist, [obs, *extra], goal, description, mode, -1, started)
        letter = next(k for k, v in choice.options.items() if v == 0)
        p_ok = choice.probabilities[letter]
        rival = max((p for k, p in choice.probabilities.items() if k != letter), default=0.0)
        duplicate = same_frame(obs, hist[-1])
        ok = choice.index == 0 and p_ok > rival and not math.isclose(p_ok, rival, rel_tol=1e-9) and not duplicate
        return StepVerdict(ok, p_ok, choice, choice.raw, choice.engine, mode, choice.timings, lenient=choice.lenient,
                           duplicate=duplicate, settings=choice.settings, usage=choice.usage)

    def _choose(self, question: Question, context: list, cands: list, mode: str, started: float,
                prepare_s: float) -> ChoiceResult:
        """Ask a candidates question through :meth:`ask` (debiased as it says in fast mode)."""
        ans = self.ask(question, context + cands, mode=mode)
        options = {o.letter: o.value for o in question.options}
        probs = ans.probabilities
        return ChoiceResult(options[ans.answer], ans.answer, probs[ans.answer], probs, options, ans.raw,
                            self.engine_name, mode, calls.timings(started, prepare_s, [ans]), lenient=ans.lenient,
                            **calls.made(self, mode))

    def _load(self, frames, *, single: bool = False, **kwargs: Any):
        """Frames at this model's budget, each loaded once (frames already sized at it pass through untouched)."""
        loader = _frames.load_frame if single else _frames.load_frames
        return loader(frames, budget=self.budget, bgr=self.bgr, **kwargs)

    # ---------------------------------------------------------------- lifecycle
    def export(self, out: str | os.PathLike, *, format: str = "onnx", int8: bool = False,
               frame_size: str | tuple[int, int] | None = None, overwrite: bool = False):
        """Export this model's weights for another runtime (``format="onnx"``: vision / embedding / decoder graphs).

        Returns the export folder, which ``TPRU(folder)`` loads with the onnx engine.
        """
        if format != "onnx":
            raise ConfigError(f"export format must be 'onnx', got {format!r}")
        from tpru_agent.onnx.export import export_onnx

        return export_onnx(self.model_name, out, int8=int8, frame_size=frame_size, overwrite=overwrite)

    def info(self) -> dict[str, Any]:
        """What is loaded: engine, model, load time, and the engine's own facts (parameters, memory...)."""
        facts = self.engine.info()
        return {"engine": self.engine_name, "model": self.model_name, "load_s": self.load_s, **facts}

    def close(self) -> None:
        """Release the engine (memory, connections)."""
        self.engine.close()

    def __enter__(self) -> "TPRU":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TPRU(model={self.model_name!r}, engine={self.engine_name!r})"


__all__ = ["TPRU", "Answer", "MODES", "MAX_ORDER_FRAMES", "softmax"]
