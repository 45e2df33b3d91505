"""A test engine that reads the step number painted into each frame (the truth), so facade logic can be checked.

Not a stand-in for the model: the real Qwen2.5-VL path is tested on the tiny checkpoint. This engine implements the
engine protocol exactly and answers every TPRU question correctly, with log-scores 0 (right) and -4 (wrong).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from tpru_agent.engines.base import GenerationOptions
from tpru_agent.tasks import extract_answer


def frame(step: int) -> Image.Image:
    """A frame whose red channel encodes its step (plus texture so frames differ)."""
    arr = np.zeros((140, 168, 3), np.uint8)
    arr[..., 0] = 10 * step
    arr[..., 1] = (np.arange(168) * 7 + step * 13) % 256
    return Image.fromarray(arr)


def step_of(image) -> int:
    return round(float(np.asarray(image)[..., 0].mean()) / 10)


class PixelOracle:
    """Answers every TPRU question correctly from the painted step numbers; counts its calls."""

    name = "oracle"

    def __init__(self, reply: str | None = None):
        self.reply = reply
        self.score_calls = 0
        self.generate_calls = 0
        self.prefixes: list[str] = []

    def _truth(self, request) -> str:
        q = request.question
        steps = [step_of(im) for im in request.images]
        if q.task == "ordering":
            return "".join(label for _, label in sorted(zip(steps, q.labels)))
        context = steps[: len(q.context_steps)]
        cands = steps[len(q.context_steps):]
        want = min(context) - 1 if q.task == "previous" else context[q.context_steps.index(q.target_step - 1)] + 1
        for option in q.options:
            if option.value is not None and cands[option.value] == want:
                return option.letter
        return q.none_letter

    def score(self, request, continuations, *, prefix=""):
        self.score_calls += 1
        self.prefixes.append(prefix)
        truth = self._truth(request)
        return [0.0 if extract_answer(c) == truth else -4.0 for c in continuations]

    def generate(self, requests, options=GenerationOptions()):
        self.generate_calls += len(requests)
        return [self.reply or f"<think>steps read from pixels</think><answer>{self._truth(r)}</answer>"
                for r in requests]


