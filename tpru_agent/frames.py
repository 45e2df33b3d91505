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

import base64
import glob as globlib
import hashlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, EngineUnavailableError, FrameError
from .video import read_video

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


def resize_to_budget(image: Image.Image, budget: PixelBudget = TPRU_BUDGET) -> Image.Image:
    """Resize ``image`` to the pixel budget with qwen-vl-utils' ``smart_resize`` (keeps the aspect ratio).

    Args:
        image: any PIL image; the result is RGB.
        budget: pixel range and side multiple; :data:`TPRU_BUDGET` matches TPRU training.

    Returns:
        An RGB image whose sides are multiples of ``budget.factor`` and whose area lies in the budget.

    Raises:
        FrameError: the aspect ratio is beyond what Qwen2.5-VL accepts (200:1).
        EngineUnavailableError: qwen-vl-utils cannot be imported.

    Example:
        >>> from PIL import Image
        >>> resize_to_budget(Image.new("RGB", (640, 480))).size   # doctest: +SKIP
        (224, 168)
    """
    # Imported here: qwen_vl_utils imports torch (seconds), and `import tpru_agent` must stay light.
    try:
        from qwen_vl_utils import smart_resize
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise EngineUnavailableError(
            f"resizing frames to the TPRU pixel budget needs qwen-vl-utils (and torch/torchvision), which cannot "
            f"be imported ({exc}). Install it with: pip install 'tpru-agent[hf]', or pass budget=None"
        ) from exc
    if budget.off_distribution and budget not in _warned_budgets:
        _warned_budgets.add(budget)
        log.warning(
            "pixel budget %s is far from TPRU's training range (%d-%d px, factor %d): expect a distribution "
            "shift and lower accuracy", budget, TRAINED_MIN, TRAINED_MAX, TRAINED_FACTOR,
        )
    image = _to_rgb(image)
    width, height = image.size
    try:
        new_h, new_w = smart_resize(height, width, factor=budget.factor,
                                    min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    except ValueError as exc:  # aspect ratio above qwen-vl-utils' MAX_RATIO
        raise FrameError(f"a {width}x{height} image cannot be resized for the model ({exc}); crop it first") from exc
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
    if isinstance(frame, (str, os.PathLike)) and not _is_inline(frame):
        if is_video(frame) and _as_path(frame).is_file():
            raise _error("is a video, not one frame; pass it to load_frames (it samples video_frames frames)",
                         index, str(frame), what)
        found = list(_expand_path(frame, index, video_frames=1, timestamps=None, what=what))
        if len(found) != 1 or found[0][2]:
            raise _error(f"matches {len(found)} files where one image is expected; name one image file, or use "
                         "load_frames", index, str(frame), what)
        image, source, _ = found[0]
        return _fit(image, budget, index, source, what)
    image = _decode(frame, bgr=bgr, index=index, what=what)
    return _fit(image, budget, index, _describe(frame), what)


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
        raise _error(f"video_frames must be a positive integer, got {video_frames!r}", None, None, what)
    if timestamps is not None:
        timestamps = [float(t) for t in timestamps]
        if not timestamps:
            raise _error("timestamps is empty; give at least one time in seconds, or None", None, None, what)
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
        raise _error("timestamps were given but no input is a video; drop timestamps or pass a video",
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


# --------------------------------------------------------------------------------------------------- internals


def _error(message: str, index: int | None, source: str | None, what: str) -> FrameError:
    """A FrameError whose text reads 'frame 2 of candidates ('b.png'): ...' and keeps index and source."""
    if index is None:
        where = source and repr(source)
        if what not in ("frame", "frames"):
            where = f"{what} {where}" if where else what
    else:
        where = f"frame {index}" + ("" if what in ("frame", "frames") else f" of {what}")
        where += f" ({source!r})" if source else ""
    err = FrameError(f"{where}: {message}" if where else message)
    err.index, err.source = index, source
    return err


def _check_count(count: int, min_frames: int, max_frames: int | None, what: str) -> None:
    if count >= min_frames and (max_frames is None or count <= max_frames):
        return
    allowed = (f"at least {min_frames}" if max_frames is None
               else f"exactly {min_frames}" if min_frames == max_frames
               else f"between {min_frames} and {max_frames}")
    bound = min_frames if max_frames is None else max_frames
    raise _error(f"got {count} frame{'s' * (count != 1)}; {allowed} frame{'s' * (bound != 1)} allowed, pass that many",
                 None, None, what)


def _is_inline(value) -> bool:
    return isinstance(value, str) and value.startswith("data:")


def _as_path(value) -> Path:
    text = os.fspath(value)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(os.path.expanduser(text))


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.shape} {value.dtype}"
    if isinstance(value, Image.Image):
        return f"PIL {value.mode} {value.size[0]}x{value.size[1]}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    if _is_inline(value):
        return value[:40] + "..."
    return type(value).__name__


def _natural_key(path: Path):
    parts = re.split(r"(\d+)", path.name.lower())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], path.name


def _media(paths) -> list[Path]:
    return [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS]


def _expand(item, i: int, *, bgr: bool, video_frames: int, timestamps, what: str):
    """Yield (image, source, from_video) for one item of the caller's input."""
    if isinstance(item, (str, os.PathLike)) and not _is_inline(item):
        yield from _expand_path(item, i, video_frames=video_frames, timestamps=timestamps, what=what)
    elif isinstance(item, np.ndarray) and item.ndim == 4:
        for k in range(item.shape[0]):
            yield _decode(item[k], bgr=bgr, index=i, what=what, source=f"array {item.shape}[{k}]"), \
                f"array[{k}]", False
    else:
        yield _decode(item, bgr=bgr, index=i, what=what), _describe(item), False


def _expand_path(item, i: int | None, *, video_frames: int, timestamps, what: str):
    text = os.fspath(item)
    if text.startswith(("http://", "https://")):
        raise _error("URLs are not fetched; download the file and pass its path", i, text, what)
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
            raise _error(f"directory has no images ({others}); {hint}", i, text, what)
    elif _GLOB_CHARS.search(text):
        matched = [Path(p) for p in globlib.glob(os.path.expanduser(text), recursive=True)]
        files = sorted(_media(p for p in matched if p.is_file()), key=_natural_key)
        if not files:
            raise _error(f"glob matched no image or video files ({len(matched)} other paths); check the pattern",
                         i, text, what)
    else:
        hint = f" (the folder {str(path.parent)!r} does not exist either)" if not path.parent.exists() else ""
        raise _error(f"no such file or directory{hint}; check the path", i, text, what)
    for f in files:
        _check_not_empty(f, i, what)
        if f.suffix.lower() in VIDEO_EXTENSIONS:
            for k, frame in enumerate(read_video(f, video_frames=video_frames, timestamps=timestamps,
                                                 error=lambda msg, f=f: _error(msg, i, str(f), what))):
                yield frame, f"{f}#{k}", True
        else:
            yield _open_image(f, i, what), str(f), False


def _check_not_empty(path: Path, i: int | None, what: str) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _error(f"cannot be read ({exc}); check permissions", i, str(path), what) from exc
    if size == 0:
        raise _error("file is empty (0 bytes); re-export or re-copy it", i, str(path), what)


def _open_image(path: Path, i: int | None, what: str) -> Image.Image:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _error(f"cannot be read ({exc}); check permissions", i, str(path), what) from exc
    return _decode_bytes(data, i, str(path), what)


def _decode_bytes(data: bytes, i: int | None, source: str, what: str) -> Image.Image:
    with warnings.catch_warnings():
        # Our own cap (MAX_FRAME_PIXELS) decides below; PIL's hard limit still raises DecompressionBombError.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            pixels = image.size[0] * image.size[1]
            if pixels > MAX_FRAME_PIXELS:
                raise _error(
                    f"image is {image.size[0]}x{image.size[1]} ({pixels / 1e6:.1f} Mpx), over the "
                    f"{MAX_FRAME_PIXELS / 1e6:g} Mpx cap (possible decompression bomb); downscale it, or raise "
                    "tpru_agent.frames.MAX_FRAME_PIXELS if you trust it", i, source, what)
            image.load()
        except Image.DecompressionBombError as exc:
            raise _error(f"image is too large to decode safely ({exc}); downscale it", i, source, what) from exc
        except UnidentifiedImageError as exc:
            raise _error("not a readable image (unknown or corrupt format); check that the file is really an "
                         "image", i, source, what) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise _error(f"not a readable image ({exc}); the file may be truncated or corrupt, re-export it",
                         i, source, what) from exc
    return _to_rgb(ImageOps.exif_transpose(image))


def _decode(frame, *, bgr: bool, index: int | None, what: str, source: str | None = None) -> Image.Image:
    """A PIL image, array, bytes or data URI -> RGB PIL image (paths are handled by _expand_path)."""
    idx = index
    if isinstance(frame, Image.Image):
        return _to_rgb(frame)
    if isinstance(frame, np.ndarray):
        return _from_array(frame, bgr=bgr, index=idx, source=source or _describe(frame), what=what)
    if isinstance(frame, (bytes, bytearray, memoryview)):
        if len(frame) == 0:
            raise _error("is empty (0 bytes); pass the encoded image's bytes", idx, "bytes", what)
        return _decode_bytes(bytes(frame), idx, "bytes", what)
    if _is_inline(frame):
        head, _, payload = frame.partition(",")
        if not head.endswith(";base64") or not payload:
            raise _error("only base64 data URIs are read (data:image/png;base64,...)", idx, _describe(frame), what)
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError as exc:
            raise _error(f"data URI is not valid base64 ({exc})", idx, _describe(frame), what) from exc
        return _decode_bytes(data, idx, _describe(frame), what)
    hint = " (a torch tensor? pass tensor.permute(1, 2, 0).numpy() as uint8)" if hasattr(frame, "numpy") else ""
    raise _error(f"unsupported frame type {type(frame).__name__}{hint}; pass a path, a PIL image or a uint8 "
                 "numpy array", idx, None, what)


def _from_array(array: np.ndarray, *, bgr: bool, index, source: str, what: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise _error(f"array dtype is {array.dtype}, expected uint8; convert with "
                     "(a * 255).clip(0, 255).astype('uint8') for floats in [0, 1], or a.astype('uint8')",
                     index, source, what)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        channels_first = array.ndim == 3 and array.shape[0] in (1, 3, 4)
        hint = "; it looks channels-first: use a.transpose(1, 2, 0)" if channels_first else ""
        raise _error(f"array shape {array.shape} is not HxW, HxWx3 or HxWx4{hint}", index, source, what)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise _error(f"array shape {array.shape} has no pixels", index, source, what)
    if bgr and array.ndim == 3:
        array = np.concatenate([array[:, :, 2::-1], array[:, :, 3:]], axis=2)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (as qwen-vl-utils' to_rgb does) and 16-bit scaled to 8."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _fit(image: Image.Image, budget: PixelBudget | None, index, source: str, what: str) -> Image.Image:
    if budget is None:
        return image
    try:
        return resize_to_budget(image, budget)
    except FrameError as exc:
        raise _error(str(exc), index, source, what) from exc
