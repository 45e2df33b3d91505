"""Request bodies of ``tpru serve`` (the task routes and chat completions) and image decoding.

Nothing here reads a path or fetches a URL: an image reaches the server only as bytes inside the request (a
``data:image/...;base64,`` URL or bare base64), so a client can never make the server open its own files. Image
headers are checked before any pixel is decoded (format allow-list, size cap).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tpru_agent.frames import load_frame
from tpru_agent.serve.errors import ClientError
from tpru_agent.sizing import PixelBudget

Mode = Literal["reason", "fast"]
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)

#: Largest image a client may send (pixels). Decoding is the expensive part: a 160 KB PNG can hold 49 Mpx.
MAX_REQUEST_IMAGE_PIXELS = 8_000_000


# ---------------------------------------------------------------------------------------------- task routes
class _Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = Field(default=None, max_length=2000)
    mode: Mode = "reason"


class OrderBody(_Task):
    """``POST /v1/order``: frames in any order -> their temporal order."""

    frames: list[str] = Field(min_length=2)


class NextBody(_Task):
    """``POST /v1/next``: which candidate comes after ``history`` (optionally knowing the final ``goal``)."""

    history: list[str] = Field(min_length=1)
    candidates: list[str] = Field(min_length=1)
    goal: str | None = None
    none_position: int | None = -1


class PreviousBody(_Task):
    """``POST /v1/previous``: which candidate comes right before ``later``."""

    later: list[str] = Field(min_length=1)
    candidates: list[str] = Field(min_length=1)
    none_position: int | None = -1


class VerifyBody(_Task):
    """``POST /v1/verify``: is ``observation`` a valid next step after ``history``."""

    history: list[str] = Field(min_length=1)
    observation: str
    goal: str | None = None
    distractors: list[str] | None = None


# ---------------------------------------------------------------------------------------------- chat
class ScoreField(BaseModel):
    """The ``tpru_score`` extension: log-probability of each continuation of the assistant turn."""

    model_config = ConfigDict(extra="forbid")
    continuations: list[str] = Field(min_length=1, max_length=1024)
    prefix: str = ""


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    include_usage: bool = False


class ChatBody(BaseModel):
    """``POST /v1/chat/completions``. Unknown fields are ignored, except the OpenAI ones this server does not
    implement (see :data:`tpru_agent.serve.chat.UNSUPPORTED`), which are refused by name."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[dict] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0)
    prompt_logprobs: int | None = Field(default=None, ge=0)
    return_token_ids: bool = False
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    tpru_score: ScoreField | None = None
    tpru_question: dict | None = None


# ---------------------------------------------------------------------------------------------- images
def image_bytes(value: Any, *, param: str) -> bytes:
    """Bytes of one image given as a ``data:image/...;base64,`` URL or as bare base64.

    Raises:
        ClientError: not a string, a remote URL, a data URL of another media type, or not base64.
    """
    if not isinstance(value, str) or not value:
        raise ClientError(400, f"{param} must be a data URL (data:image/png;base64,...) or base64 text",
                          param=param, code="invalid_image")
    payload = value
    if value[:5].lower() == "data:":
        match = _DATA_URL.match(value)
        media = match.group(1).lower() if match else ""
        if not media.startswith("image/"):
            raise ClientError(400, f"{param} is a data URL of type {media or 'unknown'!r}, not an image; send "
                              "data:image/png;base64,... (or jpeg, webp)", param=param, code="invalid_image")
        if ";base64" not in match.group(2).lower():
            raise ClientError(400, f"{param}: only base64 data URLs are read (data:image/png;base64,...)",
                              param=param, code="invalid_image")
        payload = value[match.end():]
    elif value.startswith(("http://", "https://", "file:", "/", "~")):
        raise ClientError(400, f"{param}: this server does not fetch URLs or read paths; inline the image as a "
                          "data URL (data:image/png;base64,...)", param=param, code="invalid_image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientError(400, f"{param} is not valid base64 ({exc})", param=param, code="invalid_image") from exc
    if not data:
        raise ClientError(400, f"{param} is empty", param=param, code="invalid_image")
    return data


def decode_image(value: Any, *, param: str, budget: PixelBudget | None = None):
    """One image reference -> RGB PIL image (resized to ``budget`` when given).

    Raises:
        ClientError: 400 for anything that is not a readable image of an accepted format, 413 for one over
            :data:`MAX_REQUEST_IMAGE_PIXELS` (judged from its header, before decoding).
    """
    from tpru_agent.errors import FrameError

    data = image_bytes(value, param=param)
    check_image_header(data, param)
    try:
        return load_frame(data, budget=budget, what=param)
    except FrameError as exc:
        raise ClientError(400, f"{param} is not a readable image: {exc}", param=param, code="invalid_image") from exc


def check_image_header(data: bytes, param: str) -> None:
    """Refuse over-large images from their header, before decoding any pixels.

    PIL's own bomb guard raises ``DecompressionBombError`` (not an ``OSError``) from ``Image.open`` itself for
    headers over twice its limit, e.g. a 118-byte PNG that says 40000x40000: that is a 413 here too.
    """
    from PIL import Image, UnidentifiedImageError

    from tpru_agent.images import IMAGE_FORMATS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
                width, height = probe.size
    except Image.DecompressionBombError as exc:
        raise ClientError(413, f"{param} is too large to decode ({exc}); the server's limit is "
                          f"{MAX_REQUEST_IMAGE_PIXELS / 1e6:g} Mpx per image", param=param,
                          code="image_too_large") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ClientError(400, f"{param} is not an image in an accepted format {IMAGE_FORMATS}: {exc}",
                          param=param, code="invalid_image") from exc
    if width * height > MAX_REQUEST_IMAGE_PIXELS:
        raise ClientError(413, f"{param} is {width}x{height} ({width * height / 1e6:.1f} Mpx), over the server's "
                          f"{MAX_REQUEST_IMAGE_PIXELS / 1e6:g} Mpx limit per image; downscale it first",
                          param=param, code="image_too_large")


def count_images(*groups: Any) -> int:
    """How many images the given fields hold (single references count 1, lists their length)."""
    return sum(len(g) if isinstance(g, list) else 1 for g in groups if g is not None)


def check_image_count(n: int, limit: int) -> None:
    """Refuse more than ``limit`` images in one request."""
    if n > limit:
        raise ClientError(400, f"too many images: {n}, the limit is {limit} per request (tpru serve "
                          "--max-images)", param="images", code="too_many_images")


__all__ = ["ChatBody", "MAX_REQUEST_IMAGE_PIXELS", "Mode", "NextBody", "OrderBody", "PreviousBody", "ScoreField",
           "StreamOptions", "VerifyBody", "check_image_count", "check_image_header", "count_images",
           "decode_image", "image_bytes"]
