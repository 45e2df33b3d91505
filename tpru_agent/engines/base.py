"""The engine contract: how a request (a rendered question + its images) becomes text or scores.

Two primitives (see DESIGN): ``generate`` answers as TPRU was trained (``<think>...</think><answer>...</answer>``);
``score`` returns the log-probability of each candidate continuation after the same prompt, which gives a
confidence for every call and a fast mode without a chain of thought.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from ..tasks.question import Question


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


@runtime_checkable
class Engine(Protocol):
    """What every back-end implements. ``name`` is what results report (``"hf"``, ``"onnx"``, ``"classic"``...)."""

    name: str

    def generate(self, requests: Sequence[Request], options: GenerationOptions = GenerationOptions()) -> list[str]:
        """One response text per request."""
        ...

    def score(self, request: Request, continuations: Sequence[str], *, prefix: str = "") -> list[float]:
        """Log-probability of each continuation as the assistant's reply, after ``prefix`` (e.g. the reasoning).

        The continuations must be distinct. Values are comparable across the continuations of one call (they
        may omit a term shared by all of them).
        """
        ...

# ``close()`` (release memory or connections) and ``info()`` (facts for ``TPRU.info``) are optional: the facade
# calls them when present.
