"""One loader for every frame source: path | glob | directory | video | PIL | ndarray -> RGB frames at the budget.

:func:`load_frames` resizes by default exactly as TPRU's training pipeline did (:mod:`tpru_agent.sizing`: PIL
scales into the 16,384..36,864-pixel budget, then the checkpoint processor rounds each side to 28). The sizing
names (``PixelBudget``, ``TPRU_BUDGET``, ``budget_size``, ``serving_budget``, ...) stay importable from here for
existing callers; new code imports them from :mod:`tpru_agent.sizing`.

Example:
    >>> from tpru_agent.frames import load_frames
    >>> frames = load_frames(["f3.png", "f1.png", "clip.mp4"], video_frames=2)   # doctest: +SKIP
    >>> [f.size for f in frames]                                                  # doctest: +SKIP
    [(224, 168), (224, 168), (224, 140), (224, 140)]
"""

from __future__ import annotations

import glob as globlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from tpru_agent.errors import FrameError
from tpru_agent.images import decode, decode_bytes, describe, fingerprint, frame_error, is_inline
from tpru_agent.sizing import (
    BUDGET_FILE,
    MAX_RATIO,
    PROCESSOR_MAX_PIXELS,
    PROCESSOR_MIN_PIXELS,
    TPRU_BUDGET,
    TRAINED_FACTOR,
    TRAINED_MAX,
    TRAINED_MIN,
    PixelBudget,
    budget_size,
    folder_budget,
    pil_step_size,
    resize_to_budget,
    serving_budget,
    smart_resize,
)
from tpru_agent.video import read_labelled, video_labels

#: The loading API, plus the sizing names (and ``fingerprint``) callers imported from here before
#: :mod:`tpru_agent.sizing` existed; new code imports those from :mod:`tpru_agent.sizing` / :mod:`tpru_agent.images`.
__all__ = ["IMAGE_EXTENSIONS", "MAX_FRAME_PIXELS", "VIDEO_EXTENSIONS", "expand_sources", "is_video", "load_frame",
           "load_frames",
           "BUDGET_FILE", "MAX_RATIO", "PROCESSOR_MAX_PIXELS", "PROCESSOR_MIN_PIXELS", "TPRU_BUDGET", "TRAINED_FACTOR",
           "TRAINED_MAX", "TRAINED_MIN", "PixelBudget", "budget_size", "fingerprint", "folder_budget",
           "pil_step_size", "resize_to_budget", "serving_budget", "smart_resize"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
#: Largest image file (in pixels) that is decoded. Guards against decompression bombs; PIL's own hard limit
#: (``2 * Image.MAX_IMAGE_PIXELS``, about 179 Mpx) still applies above it.
MAX_FRAME_PIXELS = 50_000_000
_GLOB_CHARS = re.compile(r"[*?\[]")


def load_frame(frame, *, budget: PixelBudget | None = TPRU_BUDGET, bgr: bool = False, index: int | None = None,
               what: str = "frame") -> Image.Image:
    """Load one frame: an image path, a glob matching one image, a PIL image, a numpy array or encoded bytes.

    Args:
        frame: path (``str`` / ``Path``, ``~`` and ``file://`` accepted), ``data:image/...;base64,`` URI, bytes of
            an encoded image, ``PIL.Image`` or ``numpy`` array (HxW, HxWx1, HxWx3, HxWx4, uint8).
        budget: resize to this pixel budget; ``None`` keeps the original size.
        bgr: the numpy array is in OpenCV's BGR(A) order (ignored for files and PIL images).
        index: position of this frame in the caller's input, used in error messages.
        what: the caller's name for the input (``"history"``, ``"candidates"``), used in error messages.

    Returns:
        An RGB PIL image.

    Raises:
        FrameError: missing, empty, unreadable or oversized file; wrong array shape or dtype; a video, directory or
            glob that is not exactly one image; unsupported type.

    Example:
        >>> load_frame("shot.png").mode   # doctest: +SKIP
        'RGB'
    """
    if isinstance(frame, (str, os.PathLike)) and not is_inline(frame):
        if is_video(frame) and _as_path(frame).is_file():
            raise frame_error("is a video, not one frame; give one image here (videos go where several frames are "
                              "taken: `tpru order FRAMES`, load_frames, order_frames)", index, str(frame), what)
        found = list(_expand_path(frame, index, video_frames=1, timestamps=None, what=what))
        if len(found) != 1 or found[0][2]:
            raise frame_error(f"matches {len(found)} files where one image is expected; name one image file (a "
                              "folder or glob goes where several frames are taken)", index, str(frame), what)
        image, source, _ = found[0]
        return _fit(image, budget, index, source, what)
    image = decode(frame, bgr=bgr, index=index, what=what, max_pixels=MAX_FRAME_PIXELS)
    return _fit(image, budget, index, describe(frame), what)


def load_frames(frames, *, budget: PixelBudget | None = TPRU_BUDGET, bgr: bool = False, video_frames: int = 4,
                timestamps: Sequence[float] | None = None, min_frames: int = 1, max_frames: int | None = None,
                what: str = "frames") -> list[Image.Image]:
    """Load a sequence of frames from any mix of sources, in order.

    A directory (images in natural order: ``frame_2`` before ``frame_10``), a glob pattern, a video (``video_frames``
    frames sampled evenly, or one frame at each of ``timestamps`` seconds) or a 4-D array (T x H x W x C) expands in
    place; a list or tuple may mix them with single images, PIL images and arrays.

    Args:
        frames: one source or a list / tuple of sources (see :func:`load_frame` for the single kinds).
        budget: resize every frame to this pixel budget; ``None`` keeps the original sizes.
        bgr: numpy arrays are in OpenCV's BGR(A) order (videos are converted regardless).
        video_frames: how many frames to sample evenly from each video (fewer if it is shorter).
        timestamps: seconds at which to take a frame from each video, instead of ``video_frames``.
        min_frames: fewest frames accepted after expansion.
        max_frames: most frames accepted after expansion (``None``: no limit).
        what: the caller's name for the input, used in error messages.

    Returns:
        A list of RGB PIL images.

    Raises:
        FrameError: any frame cannot be loaded (the message names its index, its file and the fix), or the count
            falls outside ``[min_frames, max_frames]``.

    Example:
        >>> frames = load_frames("episode_12/", min_frames=4)   # doctest: +SKIP
    """
    if isinstance(video_frames, bool) or not isinstance(video_frames, int) or video_frames < 1:
        raise frame_error(f"video_frames must be a positive integer, got {video_frames!r}", None, None, what)
    if timestamps is not None:
        try:
            timestamps = [float(t) for t in timestamps]
        except (TypeError, ValueError) as exc:
            raise frame_error(f"timestamps must be numbers of seconds, got {timestamps!r}", None, None, what) from exc
        if not timestamps:
            raise frame_error("timestamps is empty; give at least one time in seconds, or None", None, None, what)
    if isinstance(frames, (list, tuple, Iterator)):
        items = list(frames)
    else:
        items = [frames]
    out: list[Image.Image] = []
    saw_video = False
    for i, item in enumerate(items):
        for image, source, from_video in _expand(item, i, bgr=bgr, video_frames=video_frames,
                                                 timestamps=timestamps, what=what):
            saw_video = saw_video or from_video
            out.append(_fit(image, budget, i, source, what))
    if timestamps is not None and not saw_video:
        raise frame_error("timestamps were given but no input is a video; drop timestamps or pass a video",
                          None, None, what)
    _check_count(len(out), min_frames, max_frames, what)
    return out


def is_video(path) -> bool:
    """True when ``path`` names a video file by its extension (mp4, avi, mov, mkv, webm).

    Example:
        >>> is_video("clip.MP4"), is_video("a.png"), is_video(None)
        (True, False, False)
    """
    if not isinstance(path, (str, os.PathLike)):
        return False
    return Path(os.fspath(path)).suffix.lower() in VIDEO_EXTENSIONS


def expand_sources(frames, *, video_frames: int = 4, timestamps: Sequence[float] | None = None,
                   what: str = "frames") -> list[str]:
    """One display name per frame :func:`load_frames` would return, in the same order, without decoding images.

    Files give their path, video frames ``"clip.mp4@1.50s"`` (from the header), in-memory frames a short description.

    Raises:
        FrameError: a path is missing, or a folder or glob names no images (as :func:`load_frames` would).

    Example:
        >>> expand_sources(["b.png", "frames/"])   # doctest: +SKIP
        ['b.png', 'frames/frame_1.png', 'frames/frame_2.png']
    """
    items = list(frames) if isinstance(frames, (list, tuple, Iterator)) else [frames]
    names: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)) and not is_inline(item):
            for f in _resolve_files(item, i, what):
                if f.suffix.lower() in VIDEO_EXTENSIONS:
                    names += video_labels(f, video_frames=video_frames, timestamps=timestamps,
                                          error=lambda msg, f=f: frame_error(msg, i, str(f), what))
                else:
                    names.append(str(f))
        elif isinstance(item, np.ndarray) and item.ndim == 4:
            names += [f"array {item.shape}[{k}]" for k in range(item.shape[0])]
        else:
            names.append(describe(item))
    return names


# --------------------------------------------------------------------------------------------------- internals


def _check_count(count: int, min_frames: int, max_frames: int | None, what: str) -> None:
    if count >= min_frames and (max_frames is None or count <= max_frames):
        return
    allowed = (f"at least {min_frames}" if max_frames is None
               else f"exactly {min_frames}" if min_frames == max_frames
               else f"between {min_frames} and {max_frames}")
    bound = min_frames if max_frames is None else max_frames
    given = f"got {count} frame{'s' * (count != 1)}"
    raise frame_error(f"{given}; {allowed} frame{'s' * (bound != 1)} allowed, pass that many", None, None, what)


def _as_path(value) -> Path:
    text = os.fspath(value)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(os.path.expanduser(text))


def _natural_key(path: Path):
    parts = re.split(r"(\d+)", path.name.lower())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], path.name


def _media(paths) -> list[Path]:
    return [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS]


def _expand(item, i: int, *, bgr: bool, video_frames: int, timestamps, what: str):
    """Yield (image, source, from_video) for one item of the caller's input."""
    if isinstance(item, (str, os.PathLike)) and not is_inline(item):
        yield from _expand_path(item, i, video_frames=video_frames, timestamps=timestamps, what=what)
    elif isinstance(item, np.ndarray) and item.ndim == 4:
        for k in range(item.shape[0]):
            source = f"array {item.shape}[{k}]"
            yield decode(item[k], bgr=bgr, index=i, what=what, max_pixels=MAX_FRAME_PIXELS, source=source), \
                source, False
    else:
        yield decode(item, bgr=bgr, index=i, what=what, max_pixels=MAX_FRAME_PIXELS), describe(item), False


def _expand_path(item, i: int | None, *, video_frames: int, timestamps, what: str):
    for f in _resolve_files(item, i, what):
        if f.suffix.lower() in VIDEO_EXTENSIONS:
            labels, images = read_labelled(f, video_frames=video_frames, timestamps=timestamps,
                                           error=lambda msg, f=f: frame_error(msg, i, str(f), what))
            yield from ((image, label, True) for label, image in zip(labels, images))
        else:
            yield _open_image(f, i, what), str(f), False


def _resolve_files(item, i: int | None, what: str) -> list[Path]:
    """The files a path, folder or glob names (natural order), each checked to be non-empty."""
    text = os.fspath(item)
    if text.startswith(("http://", "https://")):
        raise frame_error("URLs are not fetched; download the file and pass its path", i, text, what)
    path = _as_path(item)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        entries = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        files = sorted((p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key)
        if not files:
            videos = [p.name for p in entries if p.suffix.lower() in VIDEO_EXTENSIONS]
            hint = (f"it holds video(s) {videos[:3]}; pass the video file itself" if videos else
                    f"add {'/'.join(sorted(e.lstrip('.') for e in IMAGE_EXTENSIONS))} files or pick another folder")
            others = f"{len(entries)} other file{'s' * (len(entries) != 1)}"
            raise frame_error(f"directory has no images ({others}); {hint}", i, text, what)
    elif _GLOB_CHARS.search(text):
        matched = [Path(p) for p in globlib.glob(os.path.expanduser(text), recursive=True)]
        files = sorted(_media(p for p in matched if p.is_file()), key=_natural_key)
        if not files:
            raise frame_error(f"glob matched no image or video files ({len(matched)} other paths); check the pattern",
                              i, text, what)
    else:
        hint = f" (the folder {str(path.parent)!r} does not exist either)" if not path.parent.exists() else ""
        raise frame_error(f"no such file or directory{hint}; check the path", i, text, what)
    for f in files:
        _check_not_empty(f, i, what)
    return files


def _check_not_empty(path: Path, i: int | None, what: str) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise frame_error(f"cannot be read ({exc}); check permissions", i, str(path), what) from exc
    if size == 0:
        raise frame_error("file is empty (0 bytes); re-export or re-copy it", i, str(path), what)


def _open_image(path: Path, i: int | None, what: str) -> Image.Image:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise frame_error(f"cannot be read ({exc}); check permissions", i, str(path), what) from exc
    return decode_bytes(data, i, str(path), what, max_pixels=MAX_FRAME_PIXELS)


def _fit(image: Image.Image, budget: PixelBudget | None, index, source: str, what: str) -> Image.Image:
    if budget is None:
        return image
    try:
        return resize_to_budget(image, budget)
    except FrameError as exc:
        raise frame_error(str(exc), index, source, what) from exc
