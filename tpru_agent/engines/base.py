"""The engine contract: how a request (a rendered question + its images) becomes text or scores.

Two primitives (see DESIGN): ``generate`` answers as TPRU was trained (``<think>...</think><answer>...</answer>``);
``score`` returns the log-probability of each candidate continuation after the same prompt, which gives a
confidence for every call and a fast mode without a chain of thought. Every engine (classic, hf, onnx, openai)
subclasses :class:`Engine` and implements all four methods (``generate``, ``score``, ``close``, ``info``); a
closed engine raises :class:`~tpru_agent.errors.EngineClosedError`. Every engine counts the tokens it processes
(:class:`Usage`, through :meth:`Engine._add_usage` / :meth:`Engine.take_usage`). An object passed as ``TPRU(engine=...)`` that
only has ``generate`` and ``score`` is wrapped in :class:`CustomEngine`, which completes the contract for it.

The shared parts of scoring live here too: :func:`distinct` (the continuation checks every engine makes) and
:func:`score_shared_prefix` (the shared-prefix algorithm of the hf and onnx engines).
"""

from __future__ import annotations

import abc
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from tpru_agent.errors import ConfigError, EngineClosedError
from tpru_agent.tasks.question import Question


@dataclass(frozen=True)
class Request:
    """One question for an engine.

    Attributes:
        question: the structured question (task, options, image layout); engines without a language model
            (classic) answer from it directly.
        text: the user message with one ``<image>`` placeholder per image, preamble included.
        images: RGB ``PIL.Image`` frames, one per placeholder, in order, already at the pixel budget.
    """

    question: Question
    text: str
    images: tuple = field(repr=False)


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding options. Greedy by default; ``max_new_tokens`` is the reasoning budget."""

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Usage:
    """Tokens an engine processed (summed with ``+``).

    Attributes:
        prompt_tokens: prompt tokens fed to the model (text and image placeholder tokens, scored continuations
            included); the hf and onnx engines count what they actually computed, so a prompt prefix reused from
            their caches is not counted again.
        image_tokens: the part of ``prompt_tokens`` that are image placeholder tokens.
        generated_tokens: new tokens decoded (a stop token included).
    """

    prompt_tokens: int = 0
    image_tokens: int = 0
    generated_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(self.prompt_tokens + other.prompt_tokens, self.image_tokens + other.image_tokens,
                     self.generated_tokens + other.generated_tokens)

    def to_dict(self) -> dict[str, int]:
        """``{"prompt_tokens": ..., "image_tokens": ..., "generated_tokens": ...}``."""
        return asdict(self)


_USAGE_GUARD = threading.Lock()


class Engine(abc.ABC):
    """What every back-end implements. ``name`` is what results report (``"hf"``, ``"onnx"``, ``"classic"``...).

    ``budget`` is the :class:`~tpru_agent.sizing.PixelBudget` the engine serves frames at when it knows one (a
    model folder's own training budget); ``None`` leaves it to the facade.

    Token usage: an engine calls :meth:`_add_usage` from ``generate`` / ``score`` for the tokens it processed;
    :meth:`take_usage` returns what was counted on the calling thread since the last take (the facade takes it
    around each public call; a server calls engines from its own worker thread, so counts never mix).
    """

    name: str = "engine"
    budget: Any = None

    def _usage_state(self) -> threading.local:
        state = self.__dict__.get("_usage_local")
        if state is None:
            with _USAGE_GUARD:  # subclasses need not call an __init__ here: created on first use, once
                state = self.__dict__.setdefault("_usage_local", threading.local())
        return state

    def _add_usage(self, *, prompt: int = 0, image: int = 0, generated: int = 0) -> None:
        """Count tokens processed on the calling thread (prompt tokens fed, the image ones among them, new tokens)."""
        state = self._usage_state()
        state.usage = getattr(state, "usage", Usage()) + Usage(int(prompt), int(image), int(generated))

    def take_usage(self) -> Usage:
        """The :class:`Usage` counted on the calling thread since the last take; resets it to zero."""
        state = self._usage_state()
        usage = getattr(state, "usage", Usage())
        state.usage = Usage()
        return usage

    def counting(self, call: Callable[[], Any]) -> tuple[Any, Usage]:
        """``call()`` and the :class:`Usage` this engine counted on the calling thread while it ran (counts left
        by earlier work are dropped first)."""
        self.take_usage()
        result = call()
        return result, self.take_usage()

    @abc.abstractmethod
    def generate(self, requests: Sequence[Request], options: GenerationOptions = GenerationOptions()) -> list[str]:
        """One response text per request.

        Raises:
            ConfigError: a request's ``<image>`` placeholders do not match its images.
            EngineClosedError: after :meth:`close`.
        """

    @abc.abstractmethod
    def score(self, request: Request, continuations: Sequence[str], *, prefix: str = "") -> list[float]:
        """Log-probability of each continuation as the assistant's reply, after ``prefix`` (e.g. the reasoning).

        Values are comparable across the continuations of one call (they may omit a term shared by all of
        them). No continuations: ``[]``.

        Raises:
            ConfigError: repeated continuations, or a placeholder / image count mismatch.
            EngineClosedError: after :meth:`close`.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release memory, sessions or connections; later calls raise :class:`EngineClosedError`. Idempotent."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Facts for ``TPRU.info()``; holds at least ``"engine"`` (the name)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CustomEngine(Engine):
    """An object with ``generate`` and ``score`` (``TPRU(engine=obj)``) held to the whole contract.

    ``close`` / ``info`` call the object's own when it has them; after ``close`` every call raises
    :class:`EngineClosedError`. Other attributes are read from the object. Usage is not known: zeros.
    """

    def __init__(self, inner: Any):
        missing = [m for m in ("generate", "score") if not callable(getattr(inner, m, None))]
        if missing:
            raise ConfigError(f"engine must be a name ('auto', 'hf', 'onnx', 'openai', 'classic') or an object "
                              f"with generate() and score(); {type(inner).__name__} lacks {', '.join(missing)}")
        self.inner = inner
        self.name = str(getattr(inner, "name", type(inner).__name__))
        self.budget = getattr(inner, "budget", None)
        self._closed = False

    def _live(self) -> Any:
        if self._closed:
            raise EngineClosedError(f"this {self.name} engine was closed; create a new one")
        return self.inner

    def generate(self, requests: Sequence[Request], options: GenerationOptions = GenerationOptions()) -> list[str]:
        return self._live().generate(requests, options)

    def score(self, request: Request, continuations: Sequence[str], *, prefix: str = "") -> list[float]:
        return self._live().score(request, continuations, prefix=prefix)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            closer = getattr(self.inner, "close", None)
            if callable(closer):
                closer()

    def info(self) -> dict[str, Any]:
        own = getattr(self._live(), "info", None)
        return {"engine": self.name, **(own() if callable(own) else {})}

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (during __init__ or unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"CustomEngine({self.inner!r})"


def as_engine(obj: Any) -> Engine:
    """``obj`` itself when it is an :class:`Engine`, else ``obj`` wrapped in :class:`CustomEngine`.

    Raises:
        ConfigError: ``obj`` has no ``generate`` or no ``score``.
    """
    return obj if isinstance(obj, Engine) else CustomEngine(obj)


def no_quantization(quantization: str | None) -> None:
    """Refuse a quantization an engine without bitsandbytes weights cannot honour (``None`` / ``"none"`` pass).

    Raises:
        ConfigError: any other value, saying where quantisation is done instead.
    """
    if quantization is not None and str(quantization).strip().lower() not in {"none", ""}:
        raise ConfigError(f"quantization={quantization!r} applies to the hf engine only; for ONNX export with "
                          "`tpru export --int8`, for a server quantise on the server side")


def only_auto(option: str, value: Any, engine: str, why: str) -> None:
    """Refuse an option an engine has no say over unless it is ``"auto"`` (``None`` passes too).

    Raises:
        ConfigError: ``value`` is something else; the message names the option, the engine and ``why``.
    """
    if value is not None and str(value).strip().lower() != "auto":
        raise ConfigError(f"{option}={value!r} cannot be honoured by the {engine} engine: {why}")


def distinct(continuations: Sequence[str]) -> list[str]:
    """The continuations as a list, checked as every engine checks them.

    Raises:
        ConfigError: a continuation is repeated (its value would be ambiguous in any answer distribution).
    """
    conts = list(continuations)
    repeated = sorted(c for c, k in Counter(conts).items() if k > 1)
    if repeated:
        raise ConfigError(f"continuations must be distinct; repeated: {repeated[:5]}")
    return conts


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence.

    Example:
        >>> common_prefix([[1, 2, 3], [1, 2, 4]])
        2
    """
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def score_shared_prefix(prompt: str, conts: Sequence[str], *, encode: Callable[[str], list[int]],
                        prefill: Callable, run_rests: Callable, chunk_size: Callable[[Any, int], int],
                        check_rests: Callable[[list[list[int]]], None] | None = None) -> list[float]:
    """The scoring algorithm of the hf and onnx engines: the shared prefix runs once, then each continuation's rest.

    Each continuation's value is the sum of the log-probs of its tokens after the longest token prefix shared by
    every candidate and by the bare ``prompt`` (tokens, not characters: Qwen glues ``>A`` into one token). Every
    candidate keeps at least one scored token; the first one is read from the prefill's next-token log-probs.

    Args:
        prompt: the templated conversation (image pads expanded) followed by the score's ``prefix``.
        conts: the continuations, distinct and non-empty (see :func:`distinct`).
        encode: text -> token ids (no special tokens added).
        prefill: ``ids -> (next-token log-probs, cache, M-RoPE delta)`` for the shared ids.
        run_rests: ``(rests, cache, shared, delta) -> [sum of log-probs of tokens 1.. of each rest]``.
        chunk_size: ``(cache, n) -> rests per run_rests call`` (memory bound).
        check_rests: called with the rests before any model runs (e.g. to refuse image tokens in them).

    Raises:
        ConfigError: the prompt is empty (nothing to condition on).
    """
    seqs = [encode(prompt + c) for c in conts]
    shared = common_prefix([*seqs, encode(prompt)])
    shared = min(shared, min(len(s) for s in seqs) - 1)  # every candidate keeps >= 1 scored token
    if shared < 1:
        raise ConfigError("the prompt is empty: nothing to condition the continuations on")
    rests = [s[shared:] for s in seqs]
    if check_rests is not None:
        check_rests(rests)
    first, cache, delta = prefill(seqs[0][:shared])
    totals = [float(first[r[0]]) for r in rests]
    todo = [i for i, r in enumerate(rests) if len(r) > 1]
    chunk = max(1, chunk_size(cache, len(todo)))
    for begin in range(0, len(todo), chunk):
        idx = todo[begin:begin + chunk]
        for i, value in zip(idx, run_rests([rests[i] for i in idx], cache, shared, delta)):
            totals[i] += value
    return totals
