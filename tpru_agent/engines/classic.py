"""The classic engine: TPRU's task calls answered from visual continuity alone, with no weights.

How it works. Each image becomes two cheap OpenCV features: a pyramid of blurred CIE Lab thumbnails (32, 16, 8
and 4 px: where things are and what colour; the coarse levels make the distance grow with how far something
moved) and a 12x4x4 HSV colour histogram (global colour content, blind to position). The distance between two
frames is a weighted sum of the two L1 distances, so it is a metric (the triangle inequality holds), 0 for
identical frames (Canny edge-density maps were tried and lowered accuracy on Meta-World, so they are not used).
A procedure is assumed to change the scene a little at each step, so neighbouring steps are close and the frames
lie along a short path. With no language model, it counts no tokens: its usage is always zero.

- Ordering (``"ordering"``): the log-score of a permutation is minus the length of the path it draws through
  the frame-distance matrix, divided by a temperature proportional to the mean pairwise distance (scale-free).
  All label permutations are scored exhaustively (24 for TPRU's 4 frames). A path and its reverse have the same
  length, so **a permutation and its reverse always get equal probability**: from frames alone the engine
  cannot tell which end is the start, and it says so (no direction cue is used). Its best confidence for an
  ordering is therefore 0.5; when answering (``generate``) it picks the first of the tied pair in the question's
  answer order (``ABCD`` before ``DCBA``), which is a coin flip with respect to the truth.
- Ordering any number of frames (:meth:`ClassicEngine.order`, which ``TPRU.order_frames`` uses for more than 4):
  the shortest path through the whole distance matrix (:func:`tpru_agent.pairwise.shortest_path`), not 4-frame
  windows (their pairwise preferences would all be 0.5 and the aggregation would echo the input; issue 14). The
  direction is the same explicit guess: the end shown earlier among the inputs comes first. The confidence is
  the geometric mean, over 4-frame covering windows, of the probability above of the path restricted to each:
  at most 0.5, because the reverse is always as likely.
- Ordering as multiple choice (``"ordering_mcq"``): each permutation option scores as above; the "None" option
  scores like a path ``none_order_margin`` mean-distances longer than the shortest path over all permutations,
  so "None" wins when no option is close to the best path.
- Next / previous frame (``"next"``, ``"previous"``): each candidate is placed at the target step among the
  context steps. Its cost is (a) how much it lengthens the path between its neighbouring context steps
  (``d(prev, c) + d(c, next) - d(prev, next)``, e.g. for TPRU's next-frame form between step 2 and the goal
  step 4), or, with one neighbour only, how far its distance to that neighbour is from the typical per-step
  distance of the context (with a single context frame, simply its distance to it); plus (b) ``order_weight``
  times the violations of progress (a frame after step *b* should be farther from any earlier context step *a*
  than *b* is, and so on for every pair of context steps); plus a step-back penalty rising linearly to
  ``backward_cost`` as a frame after steps *a* < *b* (*b* the step right before it) comes ``backward_steps``
  steps closer to *a* than to *b* (mirrored before them): that is a step back towards an earlier state, however short, and without it a step
  backwards passed ``verify_step`` at P(ok) 0.79 (issue 14); plus (c) a repeat penalty rising linearly to
  ``duplicate_cost`` as the candidate comes closer than ``duplicate_steps`` steps to a context frame (a copy of
  a context frame is not a new step, though it continues the path perfectly; with a single context frame, whose
  step size is unknown, only near-copies count). Costs are in units of the typical per-step distance of the
  context. The "None" option scores as a candidate of cost
  ``none_cost``: "None" wins when no candidate is close enough.

What it cannot know. It does not read text: the description is ignored, so negative samples whose text
contradicts the images (TPRU's cross-modal check) are beyond it, and it cannot tell a correct procedure from a
smooth but wrong one. It has no notion of causality or goals (a drawer closing looks as continuous as one
opening), only of visual change; scenes that change abruptly between steps (GUI page loads, camera cuts) break
its continuity assumption; and candidates from another episode of the same scene can be closer than the true
frame. Generation options (temperature, budget) are ignored: it is deterministic.

Calibration. The feature weights, temperatures, ``order_weight``, ``none_cost`` and the repeat penalty were
chosen on episodes rendered with seed 100 (Meta-World: all 50 tasks, 2 episodes each; MiniWoB: 4 episodes per
scripted task) by ``benchmarks/classic_accuracy.py --tasks 50 --episodes 2 --miniwob 4 --calibrate --seed 100``
(a coordinate search: accuracy first, then the likelihood of the truth), which the accuracy benchmark (seed 0)
does not use. Fitted on robot episodes alone, "None" came out cheaper (``none_cost`` 1.5) and GUI next-frame
accuracy fell from 74% to 38%: the threshold is domain-dependent, so tune it for your own scenes.
``none_order_margin`` (multiple-choice ordering) is a rule of thumb, not fitted. The step-back penalty
(``backward_cost`` 4, ``backward_steps`` 0.25) was added later (issue 14) and chosen on 12 Meta-World tasks x 2
episodes, 3 draws: seed 100 for the choice, seed 0 to check it. A step backwards (two history frames, the frame
before them) passed ``verify_step`` 99% / 99% of the time before, 13% / 12% after; a true next step 99% / 100%
before, 95% / 97% after; 4-candidate next-frame accuracy 49% -> 43% / 42% -> 43%, previous-frame 43% -> 42% /
46% -> 56% (72 questions each: differences of a few points are within noise).

Example:
    >>> from tpru_agent import TPRU
    >>> r = TPRU("classic").order_frames("examples/frames", mode="fast")           # doctest: +SKIP
    >>> r.answer, round(r.probabilities["BDAC"], 3), round(r.probabilities["CADB"], 3)  # doctest: +SKIP
    ('BDAC', 0.148, 0.148)

    The true order is CADB: the path is right, its direction is the coin flip described above.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tpru_agent import pairwise
from tpru_agent.engines.base import Engine, GenerationOptions, Request, distinct, no_quantization, only_auto
from tpru_agent.engines.classic_features import ClassicConfig, Features
from tpru_agent.errors import ConfigError, EngineClosedError
from tpru_agent.tasks.answer import extract_answer
from tpru_agent.tasks.question import LETTERS, Question, split_images

#: Log-score of a continuation that is not a valid answer to the question (probability ~0, but finite so a
#: softmax over scores stays defined).
IMPOSSIBLE = -1e4


class ClassicEngine(Engine):
    """No-weights engine implementing the engine protocol from visual continuity (numpy + OpenCV).

    Args:
        config: a :class:`ClassicConfig`; ``None`` for the calibrated defaults.
        device: accepted for a uniform command line (``auto``, ``cpu``, ``cuda[:N]``, ``mps``): the engine always
            runs on the CPU (OpenCV + numpy), so a command that names a GPU still falls back to it.
        dtype: ``"auto"`` only (there are no weights).
        quantization: ``None`` only (there are no weights).
        min_pixels, max_pixels: the budget the facade sizes frames at (``engine.budget``); the engine itself works
            at any size.
        **overrides: fields of :class:`ClassicConfig` to change.

    Raises:
        ConfigError: an unknown override, a bad value, a quantization or dtype, or a device string of no kind.

    Example:
        >>> from tpru_agent.engines.classic import ClassicEngine
        >>> ClassicEngine(none_cost=2.0).config.none_cost
        2.0
    """

    name = "classic"

    def __init__(self, config: ClassicConfig | None = None, *, device: str = "auto", dtype: str = "auto",
                 quantization: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                 **overrides):
        import cv2  # a base dependency (opencv-python-headless); imported here to keep `import tpru_agent` light

        no_quantization(quantization)
        only_auto("dtype", dtype, "classic", "it has no weights")
        kind, _, index = str(device).lower().partition(":")
        if kind not in {"auto", "cpu", "cuda", "mps"} or (index and not index.isdigit()):
            raise ConfigError(f"device {device!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' "
                              "(the classic engine runs on the CPU whichever is named)")
        if min_pixels is not None or max_pixels is not None:
            from tpru_agent.sizing import serving_budget

            self.budget = serving_budget(None, min_pixels, max_pixels)
        self._cv2 = cv2
        base = config or ClassicConfig()
        unknown = set(overrides) - set(ClassicConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown classic engine option(s) {sorted(unknown)}; valid options: "
                              f"{', '.join(ClassicConfig.__dataclass_fields__)}")
        self.config = ClassicConfig(**{**base.__dict__, **overrides})
        cfg = self.config
        if min(cfg.order_temperature, cfg.choice_temperature, cfg.duplicate_steps, cfg.backward_steps) <= 0:
            raise ConfigError("order_temperature, choice_temperature, duplicate_steps and backward_steps must be > 0, "
                              f"got {cfg.order_temperature}, {cfg.choice_temperature}, {cfg.duplicate_steps}, "
                              f"{cfg.backward_steps}")
        if not cfg.grid_sizes or any(not 1 <= int(n) <= 64 for n in cfg.grid_sizes):
            raise ConfigError(f"grid_sizes must be thumbnail sizes in 1..64 px, got {cfg.grid_sizes}")
        self._features = Features(self.config, cv2)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("this ClassicEngine was closed; create a new one (TPRU('classic'))")

    # ------------------------------------------------------------------ features and distances
    def features(self, image) -> tuple[np.ndarray, np.ndarray]:
        """(Lab pyramid, HSV histogram) of one PIL image, cached by content."""
        return self._features.of(image)

    def distances(self, images: Sequence) -> np.ndarray:
        """Symmetric matrix of frame distances (0 on the diagonal)."""
        return self._features.distances(images)

    # ------------------------------------------------------------------ answers -> log-scores
    def answer_scores(self, request: Request) -> tuple[dict[str, float], dict]:
        """Log-probability of every valid answer of the question, and the evidence used (for explanations)."""
        self._check_open()
        q = request.question
        if len(request.images) != q.n_images:
            raise ConfigError(f"the question shows {q.n_images} images but the request carries "
                              f"{len(request.images)}")
        split_images(request.text, len(request.images))  # the placeholders match the images, as for every engine
        dist = self.distances(request.images)
        if q.task == "ordering":
            raw, info = self._ordering(q, dist)
        elif q.task == "ordering_mcq":
            raw, info = self._ordering_mcq(q, dist)
        elif q.task in ("next", "previous"):
            raw, info = self._choice(q, dist)
        else:
            raise ConfigError(f"the classic engine cannot answer task {q.task!r}")
        top = max(raw.values())
        log_z = top + math.log(sum(math.exp(v - top) for v in raw.values()))
        info["dist"] = dist
        return {k: v - log_z for k, v in raw.items()}, info

    def _paths(self, labels: Sequence[str], dist: np.ndarray) -> dict[str, float]:
        index = {label: i for i, label in enumerate(labels)}
        return {"".join(p): float(sum(dist[index[a], index[b]] for a, b in zip(p, p[1:])))
                for p in itertools.permutations(labels)}

    @staticmethod
    def _scale(dist: np.ndarray) -> float:
        n = dist.shape[0]
        mean = float(dist.sum() / max(n * (n - 1), 1))
        return max(mean, 1e-6)

    def _ordering(self, q: Question, dist: np.ndarray):
        lengths = self._paths(q.labels, dist)
        temp = self.config.order_temperature * self._scale(dist)
        return {p: -length / temp for p, length in lengths.items()}, {"lengths": lengths}

    def _ordering_mcq(self, q: Question, dist: np.ndarray):
        lengths = self._paths(LETTERS[: q.n_images], dist)  # frames are labelled A, B, ... in input order
        scale = self._scale(dist)
        temp = self.config.order_temperature * scale
        best = min(lengths.values())
        scores = {}
        for o in q.options:
            length = best + self.config.none_order_margin * scale if o.value is None else lengths[o.value]
            scores[o.letter] = -length / temp
        return scores, {"lengths": lengths, "best": best}

    def _choice(self, q: Question, dist: np.ndarray):
        cfg = self.config
        steps = list(q.context_steps)
        n_ctx, t = len(steps), q.target_step
        if t is None or n_ctx == 0:
            raise ConfigError(f"a {q.task} question needs context steps and a target step")
        ctx = dict(zip(steps, range(n_ctx)))
        before = sorted(s for s in steps if s < t)
        after = sorted(s for s in steps if s > t)
        gaps = [(dist[ctx[a], ctx[b]] / (b - a)) for a, b in zip(sorted(steps), sorted(steps)[1:])]
        cand_idx = [n_ctx + o.value for o in q.options if isinstance(o.value, int)]
        if any(not n_ctx <= i < q.n_images for i in cand_idx):
            raise ConfigError(f"the {q.task} question has {n_ctx} context images and candidate options "
                              f"{[i - n_ctx for i in cand_idx]}, but only {q.n_images} images")
        if gaps:
            step_dist = float(np.mean(gaps))
        else:  # one context frame: the typical distance to the candidates stands in for a step
            step_dist = float(np.median(dist[0, cand_idx])) if cand_idx else 1.0
        step_dist = max(step_dist, 1e-6)
        costs = {}
        for o in q.options:
            if not isinstance(o.value, int):
                continue
            c = n_ctx + o.value
            costs[o.letter] = self._candidate_cost(dist, c, ctx, before, after, t, step_dist, bool(gaps))
        scores = {o.letter: -(cfg.none_cost if o.value is None else costs[o.letter]) / cfg.choice_temperature
                  for o in q.options}
        return scores, {"costs": costs, "step_dist": step_dist}

    def _candidate_cost(self, dist, c, ctx, before, after, t, step_dist, known_step: bool) -> float:
        prev = before[-1] if before else None
        nxt = after[0] if after else None
        if prev is not None and nxt is not None:
            local = dist[ctx[prev], c] + dist[c, ctx[nxt]] - dist[ctx[prev], ctx[nxt]]
        else:
            near = prev if prev is not None else nxt
            # one neighbour: a step should be about one typical step away (unknown with one context frame:
            # then the closest candidate continues best)
            expected = step_dist * abs(t - near) if known_step else 0.0
            local = abs(dist[ctx[near], c] - expected)
        violations = backwards = 0.0
        # Progress: distances from a context step grow with the number of steps in between.
        for a, b in itertools.combinations(sorted(ctx), 2):
            da, db, dab = dist[ctx[a], c], dist[ctx[b], c], dist[ctx[a], ctx[b]]
            if t > b:                   # a < b < t: c is farther from a than b is
                violations += max(0.0, dab - da)
                if b == prev:           # and closer to the step next to it than to an earlier one
                    backwards = max(backwards, db - da)
            elif t < a:                 # t < a < b: c is farther from b than a is
                violations += max(0.0, dab - db)
                if a == nxt:            # and closer to the step next to it than to a later one
                    backwards = max(backwards, da - db)
            else:                       # a < t < b: c is no farther from either end than the ends are apart
                violations += max(0.0, da - dab) + max(0.0, db - dab)
        # A repeat of a context frame is not a new step: cost rises to duplicate_cost as it gets identical to one.
        # With one context frame no step size is known (step_dist is then the median candidate distance): only
        # near-copies, within a tenth of it, count as repeats.
        nearest = min(dist[ctx[s], c] for s in ctx) / step_dist
        within = self.config.duplicate_steps if known_step else 0.1
        repeat = self.config.duplicate_cost * max(0.0, 1.0 - nearest / within)
        cfg = self.config
        back = cfg.backward_cost * min(1.0, backwards / (cfg.backward_steps * step_dist)) if known_step else 0.0
        return float((local + cfg.order_weight * violations) / step_dist + repeat + back)

    # ------------------------------------------------------------------ the engine protocol
    def score(self, request: Request, continuations: Sequence[str], *, prefix: str = "") -> list[float]:
        """Log-probability of each continuation (``"<answer>CABD</answer>"``); ``prefix`` is ignored.

        Probabilities are normalised over the question's whole answer space, so a continuation's score does
        not depend on which others are asked; an invalid answer scores :data:`IMPOSSIBLE`.

        Raises:
            ConfigError: repeated continuations (as every engine), or an image count that does not match.
            EngineClosedError: after :meth:`close`.
        """
        self._check_open()
        conts = distinct(continuations)
        if not conts:
            return []
        scores, _ = self.answer_scores(request)
        out = []
        for text in conts:
            answer = extract_answer(text)
            if answer is None:
                answer = text.strip()
            out.append(scores.get(answer, IMPOSSIBLE))
        return out

    def generate(self, requests: Sequence[Request], options: GenerationOptions = GenerationOptions()) -> list[str]:
        """``<think>`` with the distances behind the answer, then ``<answer>`` with the best-scoring answer.

        There is no chain of thought: the text explains the same computation :meth:`score` does (``TPRU`` therefore
        always scores with this engine, and its results say ``mode="fast"``).
        """
        self._check_open()
        return [self._explain(request) for request in requests]

    def _explain(self, request: Request) -> str:
        q = request.question
        scores, info = self.answer_scores(request)
        best_score = max(scores.values())
        best = next(a for a in q.answers() if scores[a] == best_score)  # ties: first in answer order
        probs = {a: math.exp(s) for a, s in scores.items()}
        dist = info["dist"]
        if q.task == "ordering":
            pairs = ", ".join(f"{a}-{b} {dist[i, j]:.3f}" for (i, a), (j, b)
                              in itertools.combinations(enumerate(q.labels), 2))
            rev = best[::-1]
            text = (f"Frame distances: {pairs}. The shortest path through all frames is {'-'.join(best)} "
                    f"(length {info['lengths'][best]:.3f}); its reverse {'-'.join(rev)} is equally short, and "
                    f"the frames alone do not show which end is the start, so the direction is a guess "
                    f"(probability {probs[best]:.2f} each).")
        elif q.task == "ordering_mcq":
            opts = ", ".join(f"{o.letter} {info['lengths'][o.value]:.3f}" for o in q.options if o.value)
            text = (f"Path length of each option: {opts}; the shortest path over all orders is "
                    f"{info['best']:.3f}. Best: {best} (probability {probs[best]:.2f}); a path and its reverse "
                    "are equally short.")
        else:
            costs = ", ".join(f"{k} {v:.2f}" for k, v in info["costs"].items())
            text = (f"Typical distance per step in the context: {info['step_dist']:.3f}. Continuity cost of each "
                    f"candidate at step {q.target_step} (in steps): {costs}; the 'None' option wins above "
                    f"{self.config.none_cost:.2f}. Best: {best} (probability {probs[best]:.2f}).")
        return f"<think>{text} The text description is not checked.</think><answer>{best}</answer>"

    def order(self, images: Sequence) -> PathOrder:
        """Order any number of frames (2 or more) by the shortest path through them; the direction is a guess.

        Example:
            >>> ClassicEngine().order(frames).order     # doctest: +SKIP
            (3, 0, 4, 1, 2)
        """
        self._check_open()
        if len(images) < 2:
            raise ConfigError(f"ordering needs at least 2 frames, got {len(images)}")
        dist = self.distances(images)
        path = pairwise.shortest_path(dist.tolist())
        if path[0] > path[-1]:  # the direction tie, broken explicitly: the end shown earlier among the inputs starts
            path = path[::-1]
        rank = {frame: pos for pos, frame in enumerate(path)}
        log_p, windows = 0.0, pairwise.covering_windows(len(images), 4)
        for window in windows:
            labels = LETTERS[: len(window)]
            sub = dist[np.ix_(window, window)]
            scores, _ = self._ordering(Question("ordering", "", len(window), tuple(labels)), sub)
            top = max(scores.values())
            log_z = top + math.log(sum(math.exp(v - top) for v in scores.values()))
            restricted = "".join(labels[window.index(f)] for f in sorted(window, key=rank.get))
            log_p += scores[restricted] - log_z
        length = pairwise.path_length(path, dist.tolist())
        note = (f"Shortest path through all {len(images)} frames by visual distance: {'-'.join(map(str, path))} "
                f"(input indices; length {length:.3f}). Its reverse is exactly as short: the frames alone do not show "
                "which end is the start, so the direction is a guess (the end shown earlier among the inputs "
                "starts). The text description is not checked.")
        return PathOrder(tuple(path), math.exp(log_p / len(windows)), float(length), note)

    def info(self) -> dict:
        """The engine's name and settings (no weights: nothing is loaded)."""
        return {"engine": self.name, "parameters": 0, "device": "cpu",
                "config": dict(self.config.__dict__)}

    def close(self) -> None:
        """Drop the feature cache; later calls raise :class:`~tpru_agent.errors.EngineClosedError`."""
        self._features.clear()
        self._closed = True


@dataclass(frozen=True)
class PathOrder:
    """:meth:`ClassicEngine.order`'s answer: the order (input indices), its confidence, the path length, and a
    sentence saying how it was found (direction guessed)."""

    order: tuple[int, ...]
    confidence: float
    length: float
    explanation: str


__all__ = ["ClassicConfig", "ClassicEngine", "IMPOSSIBLE", "PathOrder"]
