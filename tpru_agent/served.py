"""Frames at their served size, loaded once per call and never resized again.

:func:`tpru_agent.frames.resize_to_budget` skips a frame already at its final size, but that size is not always a
fixed point: a 253x163 frame is served at 252x168, and 252x168 would be served at 224x168. So the facade loads
each frame once (:func:`load`), and every frame it sizes is marked as served at that budget (:func:`mark`); the
engines size frames through :func:`serve`, which passes a marked frame unchanged. A marked PIL image handed back
in (the checker's history, a caller reusing frames across calls) is neither decoded nor resized again.

The mark lives beside the image (keyed by identity, dropped when the image is freed), not in it: a copy, a crop or
a resize of a marked image is a new object, unmarked, and is sized like any other frame.

Example:
    >>> from PIL import Image
    >>> from tpru_agent.frames import TPRU_BUDGET
    >>> frame = serve(Image.new("RGB", (253, 163)), TPRU_BUDGET)
    >>> frame.size, serve(frame, TPRU_BUDGET) is frame
    ((252, 168), True)
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from tpru_agent import frames as _frames
from tpru_agent.errors import FrameError

_MARKS: dict[int, tuple[weakref.ref, Any, tuple[int, int]]] = {}
_GUARD = threading.Lock()


def _forget(key: int, ref: weakref.ref) -> None:
    with _GUARD:
        if key in _MARKS and _MARKS[key][0] is ref:
            del _MARKS[key]


def mark(image, budget) -> Any:
    """Record that ``image`` is served at ``budget`` (at its current size); returns ``image``."""
    key = id(image)
    ref = weakref.ref(image, lambda r, key=key: _forget(key, r))
    with _GUARD:
        _MARKS[key] = (ref, budget, tuple(image.size))
    return image


def is_served(image, budget) -> bool:
    """True when ``image`` itself was marked as served at ``budget`` and still has that size."""
    entry = _MARKS.get(id(image))
    return (entry is not None and entry[0]() is image and entry[1] == budget
            and tuple(getattr(image, "size", ())) == entry[2])


def serve(image, budget):
    """``image`` at ``budget`` (:func:`tpru_agent.frames.resize_to_budget`), unless it is marked as served there.

    Raises:
        FrameError: the aspect ratio is beyond what Qwen2.5-VL accepts (200:1).
    """
    if budget is None or is_served(image, budget):
        return image
    return mark(_frames.resize_to_budget(image, budget), budget)


def load(frames, budget, *, bgr: bool = False, single: bool = False, **kwargs) -> Any:
    """Load frames once at ``budget``: :func:`tpru_agent.frames.load_frames` (or ``load_frame`` with ``single``),
    with frames already served at ``budget`` passed through untouched and every other frame sized and marked.

    Args:
        frames: what ``load_frames`` / ``load_frame`` accept.
        budget: the :class:`~tpru_agent.frames.PixelBudget`, or ``None`` for original sizes.
        bgr: numpy frames are in OpenCV's BGR order.
        single: one frame (``load_frame``) rather than a list.
        **kwargs: the loader's other arguments (``what``, ``min_frames``, ``video_frames``, ``index``...).

    Raises:
        FrameError: as the loader, naming the frame's index and file.
    """
    loader = _frames.load_frame if single else _frames.load_frames
    loaded = loader(frames, budget=None, bgr=bgr, **kwargs)
    if budget is None:
        return loaded
    try:
        return serve(loaded, budget) if single else [serve(image, budget) for image in loaded]
    except FrameError:
        loader(frames, budget=budget, bgr=bgr, **kwargs)  # the same failure, told with the frame's index and file
        raise


__all__ = ["is_served", "load", "mark", "serve"]
