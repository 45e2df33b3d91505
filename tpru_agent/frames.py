"""One loader for every frame source: path | glob | directory | video | PIL | ndarray -> RGB frames at the budget.

TPRU was trained on images of 16,384 to 36,864 pixels with sides that are multiples of 28 (Qwen2.5-VL: patch 14,
merge 2), about 40-50 visual tokens per frame. Serving at another size moves the model off its training
distribution, so :func:`load_frames` resizes to that budget by default with qwen-vl-utils' ``smart_resize`` (the
function the training pipeline used).

Example:
    >>> from tpru_agent.frames import load_frames
    >>> frames = load_frames(["f3.png", "f1.png", "clip.mp4"], video_frames=2)   # doctest: +SKIP
    >>> [f.size for f in frames]                                                  # doctest: +SKIP
    [(196, 168), (196, 168), (224, 140), (224, 140)]
"""

from __future__ import annotations

import glob as globlib
import hashlib
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import ConfigError, FrameError
from .images import decode, decode_bytes, describe, frame_error, is_inline, to_rgb
from .video import read_labelled, video_labels

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
#: Largest image file (in pixels) that is decoded. Guards against decompression bombs; PIL's own hard limit
#: (``2 * Image.MAX_IMAGE_PIXELS``, about 179 Mpx) still applies above it.
MAX_FRAME_PIXELS = 50_000_000
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class PixelBudget:
    """How many pixels each frame gets, and the multiple its sides are rounded to.

    Attributes:
        min_pixels: smallest area after resizing (TPRU training: 16,384).
        max_pixels: largest area after resizing (TPRU training: 36,864, about 192 x 192).
        factor: both sides become multiples of it (Qwen2.5-VL: patch 14 x merge 2 = 28).
    """

    min_pixels: int = 16384
    max_pixels: int = 36864
    factor: int = 28

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PixelBudget.{name} must be a positive integer, got {value!r}")
        if self.max_pixels < self.factor ** 2:
            raise ConfigError(
                f"PixelBudget.max_pixels ({self.max_pixels}) is below one {self.factor}x{self.factor} patch; raise it"
            )
        if self.min_pixels > self.max_pixels:
            raise ConfigError(
                f"PixelBudget.min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels}); "
                "swap them or use tpru_agent.frames.TPRU_BUDGET"
            )

    @property
    def off_distribution(self) -> bool:
        """True when this budget is far from the range TPRU was trained on."""
        return (self.min_pixels < TRAINED_MIN * 0.5 or self.max_pixels > TRAINED_MAX * 2
                or self.factor != TRAINED_FACTOR)


TRAINED_MIN, TRAINED_MAX, TRAINED_FACTOR = 16384, 36864, 28
TPRU_BUDGET = PixelBudget()
_warned_budgets: set[PixelBudget] = set()


MAX_RATIO = 200


def smart_resize(height: int, width: int, budget: PixelBudget = TPRU_BUDGET) -> tuple[int, int]:
    """``(height, width)`` as qwen-vl-utils' ``smart_resize`` computes them for this budget.

    The same integer arithmetic (tests compare the two over a grid of sizes). It lives here rather than being
    imported because importing qwen-vl-utils imports torch and torchvision (seconds per process), which the bare
    install, the classic engine and the data builder's workers must not pay for three lines of maths.

    Raises:
        FrameError: the aspect ratio is above 200:1 (Qwen2.5-VL's limit).
    """
    factor = budget.factor
    if max(height, width) / max(1, min(height, width)) > MAX_RATIO:
        raise FrameError(f"a {width}x{height} image has an aspect ratio above {MAX_RATIO}:1, which the model "
                         "cannot take; crop it first")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > budget.max_pixels:
        beta = math.sqrt((height * width) / budget.max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < budget.min_pixels:
        beta = math.sqrt(budget.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_to_budget(image: Image.Image, budget: PixelBudget = TPRU_BUDGET) -> Image.Image:
    """Resize ``image`` to the pixel budget as qwen-vl-utils' ``smart_resize`` does (keeps the aspect ratio).

    Args:
        image: any PIL image; the result is RGB.
        budget: pixel range and side multiple; :data:`TPRU_BUDGET` matches TPRU training.

    Returns:
        An RGB image whose sides are multiples of ``budget.factor`` and whose area lies in the budget.

    Raises:
        FrameError: the aspect ratio is beyond what Qwen2.5-VL accepts (200:1).

    Example:
        >>> from PIL import Image
        >>> resize_to_budget(Image.new("RGB", (640, 480))).size   # doctest: +SKIP
        (224, 168)
    """
    if budget.off_distribution and budget not in _warned_budgets:
        _warned_budgets.add(budget)
        log.warning(
            "pixel budget %s is far from TPRU's training range (%d-%d px, factor %d): expect a distribution "
            "shift and lower accuracy", budget, TRAINED_MIN, TRAINED_MAX, TRAINED_FACTOR,
        )
    image = to_rgb(image)
    width, height = image.size
    new_h, new_w = smart_resize(height, width, budget)
    factor = budget.factor
    if min(new_h, new_w) < factor or new_h * new_w > budget.max_pixels:
        # qwen-vl-utils floors the short side of a very elongated image to 0, or overshoots max_pixels when it
        # scales a thin one up: keep one patch row and cut the long side to the budget (aspect is squeezed).
        new_h, new_w = max(factor, new_h), max(factor, new_w)
        if new_h >= new_w:
            new_h = max(factor, budget.max_pixels // new_w // factor * factor)
        else:
            new_w = max(factor, budget.max_pixels // new_h // factor * factor)
        log.debug("%dx%d image is too elongated for the budget; squeezed to %dx%d", width, height, new_w, new_h)
    if (new_w, new_h) == (width, height):
        return image
    # Bicubic is PIL's default and what qwen-vl-utils' fetch_image used to build the training images.
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


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
            raise frame_error("is a video, not one frame; pass it to load_frames (it samples video_frames frames)",
                              index, str(frame), what)
        found = list(_expand_path(frame, index, video_frames=1, timestamps=None, what=what))
        if len(found) != 1 or found[0][2]:
            raise frame_error(f"matches {len(found)} files where one image is expected; name one image file, or use "
                              "load_frames", index, str(frame), what)
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


def fingerprint(image: Image.Image) -> str:
    """A content hash of an image (size, mode and pixels), for caches and de-duplication.

    Example:
        >>> from PIL import Image
        >>> fingerprint(Image.new("RGB", (2, 2))) == fingerprint(Image.new("RGB", (2, 2)))
        True
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


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
