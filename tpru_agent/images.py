"""Decoding one in-memory frame (encoded bytes, data URI, numpy array, PIL image) into an RGB PIL image.

Paths, folders, globs and videos are resolved by :mod:`tpru_agent.frames`, which calls these. Every failure is a
:class:`~tpru_agent.errors.FrameError` built by :func:`frame_error`, so messages read the same everywhere.

Example:
    >>> import numpy as np
    >>> decode(np.zeros((4, 6, 3), np.uint8), bgr=False, index=0, what="frames", max_pixels=10**6).size
    (6, 4)
"""

from __future__ import annotations

import base64
import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tpru_agent.errors import FrameError


#: Formats decoded at all. Pillow would otherwise try every plugin, EPS included, which runs Ghostscript on
#: PostScript a caller (or a server client) sends.
def _formats() -> tuple[str, ...]:
    Image.init()  # only formats this Pillow build can open (asking for a missing one raises KeyError)
    return tuple(f for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)


IMAGE_FORMATS = _formats()

def frame_error(message: str, index: int | None, source: str | None, what: str) -> FrameError:
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


def is_inline(value) -> bool:
    return isinstance(value, str) and value.startswith("data:")


def describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.shape} {value.dtype}"
    if isinstance(value, Image.Image):
        return f"PIL {value.mode} {value.size[0]}x{value.size[1]}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    if is_inline(value):
        return value[:40] + "..."
    return type(value).__name__


def decode_bytes(data: bytes, i: int | None, source: str, what: str, *, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # Our own cap (MAX_FRAME_PIXELS) decides below; PIL's hard limit still raises DecompressionBombError.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            pixels = image.size[0] * image.size[1]
            if pixels > max_pixels:
                raise frame_error(
                    f"image is {image.size[0]}x{image.size[1]} ({pixels / 1e6:.1f} Mpx), over the "
                    f"{max_pixels / 1e6:g} Mpx cap (possible decompression bomb); downscale it, or raise "
                    "tpru_agent.frames.MAX_FRAME_PIXELS if you trust it", i, source, what)
            image.load()
        except Image.DecompressionBombError as exc:
            raise frame_error(f"image is too large to decode safely ({exc}); downscale it", i, source, what) from exc
        except UnidentifiedImageError as exc:
            raise frame_error("not a readable image (unknown or corrupt format); check that the file is really an "
                              "image", i, source, what) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise frame_error(f"not a readable image ({exc}); the file may be truncated or corrupt, re-export it",
                              i, source, what) from exc
    return to_rgb(ImageOps.exif_transpose(image))


def decode(frame, *, bgr: bool, index: int | None, what: str, max_pixels: int,
           source: str | None = None) -> Image.Image:
    """A PIL image, array, bytes or data URI -> RGB PIL image (paths are handled by _expand_path)."""
    idx = index
    if isinstance(frame, Image.Image):
        return to_rgb(frame)
    if isinstance(frame, np.ndarray):
        return from_array(frame, bgr=bgr, index=idx, source=source or describe(frame), what=what)
    if isinstance(frame, (bytes, bytearray, memoryview)):
        if len(frame) == 0:
            raise frame_error("is empty (0 bytes); pass the encoded image's bytes", idx, "bytes", what)
        return decode_bytes(bytes(frame), idx, "bytes", what, max_pixels=max_pixels)
    if is_inline(frame):
        head, _, payload = frame.partition(",")
        if not head.endswith(";base64") or not payload:
            raise frame_error("only base64 data URIs are read (data:image/png;base64,...)", idx, describe(frame), what)
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError as exc:
            raise frame_error(f"data URI is not valid base64 ({exc})", idx, describe(frame), what) from exc
        return decode_bytes(data, idx, describe(frame), what, max_pixels=max_pixels)
    hint = " (a torch tensor? pass tensor.permute(1, 2, 0).numpy() as uint8)" if hasattr(frame, "numpy") else ""
    raise frame_error(f"unsupported frame type {type(frame).__name__}{hint}; pass a path, a PIL image or a uint8 "
                      "numpy array", idx, None, what)


def from_array(array: np.ndarray, *, bgr: bool, index, source: str, what: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise frame_error(f"array dtype is {array.dtype}, expected uint8; convert with "
                          "(a * 255).clip(0, 255).astype('uint8') for floats in [0, 1], or a.astype('uint8')",
                     index, source, what)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        channels_first = array.ndim == 3 and array.shape[0] in (1, 3, 4)
        hint = "; it looks channels-first: use a.transpose(1, 2, 0)" if channels_first else ""
        raise frame_error(f"array shape {array.shape} is not HxW, HxWx3 or HxWx4{hint}", index, source, what)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise frame_error(f"array shape {array.shape} has no pixels", index, source, what)
    if bgr and array.ndim == 3:
        array = np.concatenate([array[:, :, 2::-1], array[:, :, 3:]], axis=2)
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def to_rgb(image: Image.Image) -> Image.Image:
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


def fingerprint(image) -> str:
    """The one content hash of an image, for caches and de-duplication (32 hex digits).

    A PIL image hashes its mode, size and pixels; an array (``uint8 [H, W, 3]`` pixels) its dtype, shape and
    bytes. Equal content gives equal keys, so engines share visual features and prefixes by it.

    Example:
        >>> fingerprint(Image.new("RGB", (2, 2))) == fingerprint(Image.new("RGB", (2, 2)))
        True
    """
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(image, Image.Image):
        digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
        digest.update(image.tobytes())
    else:
        array = np.ascontiguousarray(image)
        digest.update(f"{array.dtype.str}:{'x'.join(map(str, array.shape))}:".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
