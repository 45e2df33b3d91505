"""Request bodies of ``tpru serve``: images from data URLs / base64, chat messages -> engine requests, errors.

Nothing here reads a path or fetches a URL: an image reaches the server only as bytes inside the request (a
``data:image/...;base64,`` URL or bare base64), so a client can never make the server open its own files.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .engines.base import GenerationOptions
from .frames import PixelBudget, load_frame
from .tasks.question import IMAGE, MAX_CANDIDATES, Option, Question

_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)


class ClientError(Exception):
    """A request the server refuses: rendered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error shape every refusal uses."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
    """One image reference -> RGB PIL image (resized to ``budget`` when given)."""
    from .errors import FrameError

    data = image_bytes(value, param=param)
    _check_size(data, param)
    try:
        return load_frame(data, budget=budget, what=param)
    except FrameError as exc:
        raise ClientError(400, f"{param} is not a readable image: {exc}", param=param, code="invalid_image") from exc


#: Largest image a client may send (pixels). Decoding is the expensive part: a 160 KB PNG can hold 49 Mpx.
MAX_REQUEST_IMAGE_PIXELS = 8_000_000


def _check_size(data: bytes, param: str) -> None:
    """Refuse over-large images from their header, before decoding any pixels."""
    import io

    from PIL import Image, UnidentifiedImageError

    from .images import IMAGE_FORMATS

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ClientError(400, f"{param} is not an image in an accepted format {IMAGE_FORMATS}: {exc}",
                          param=param, code="invalid_image") from exc
    if width * height > MAX_REQUEST_IMAGE_PIXELS:
        raise ClientError(413, f"{param} is {width}x{height} ({width * height / 1e6:.1f} Mpx), over the server's "
                          f"{MAX_REQUEST_IMAGE_PIXELS / 1e6:g} Mpx limit per image; downscale it first",
                          param=param, code="image_too_large")


def count_images(*groups: Any) -> int:
    """How many images the given fields hold (single references count 1, lists their length)."""
    total = 0
    for group in groups:
        if group is None:
            continue
        total += len(group) if isinstance(group, list) else 1
    return total


def check_image_count(n: int, limit: int) -> None:
    if n > limit:
        raise ClientError(400, f"too many images: {n}, the limit is {limit} per request (tpru serve "
                          "--max-images)", param="images", code="too_many_images")


# ---------------------------------------------------------------------------------------------- chat
class ScoreField(BaseModel):
    """The ``tpru_score`` extension: log-probability of each continuation of the assistant turn."""

    model_config = ConfigDict(extra="forbid")
    continuations: list[str] = Field(min_length=1, max_length=720)
    prefix: str = Field(default="", max_length=200_000)


class ChatBody(BaseModel):
    """``POST /v1/chat/completions``. Unknown OpenAI / vLLM fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[dict] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = 1
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    prompt_logprobs: int | None = Field(default=None, ge=0)
    return_token_ids: bool = False
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    tpru_score: ScoreField | None = None
    tpru_question: dict | None = None


@dataclass(frozen=True)
class ChatCall:
    """A chat request reduced to what the engine needs."""

    text: str
    image_refs: tuple[str, ...]
    prefill: str | None
    options: GenerationOptions


def parse_chat(body: ChatBody, defaults: GenerationOptions, *, max_images: int, max_logprobs: int = 20) -> ChatCall:
    """One user turn (text + ``image_url`` parts; an optional system turn is refused) and an optional prefill.

    Raises:
        ClientError: message layout or parts this server cannot run, or too many images.
    """
    if body.stream:
        raise ClientError(400, "stream: true is not supported by this server; send stream: false", param="stream")
    if body.n != 1:
        raise ClientError(400, f"n must be 1 (one choice per request), got {body.n}", param="n")
    for field in ("top_logprobs", "prompt_logprobs"):
        if (getattr(body, field) or 0) > max_logprobs:
            raise ClientError(400, f"{field} is {getattr(body, field)}, above this server's limit of {max_logprobs} "
                              "(tpru serve --max-logprobs)", param=field)
    msgs = body.messages
    prefill = None
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise ClientError(400, "continue_final_message needs add_generation_prompt: false (as in vLLM)",
                              param="add_generation_prompt")
        if msgs[-1].get("role") != "assistant":
            raise ClientError(400, "continue_final_message needs the last message to be the assistant's",
                              param="messages")
        prefill = _text_only(msgs[-1].get("content"), "messages[-1].content")
        msgs = msgs[:-1]
    if len(msgs) != 1 or msgs[0].get("role") != "user":
        raise ClientError(400, "send exactly one user message (plus an assistant prefill with "
                          "continue_final_message): the served model answers single-turn TPRU prompts",
                          param="messages")
    content = msgs[0].get("content")
    pieces, refs = [], []
    if isinstance(content, str):
        pieces.append(content)
    elif isinstance(content, list):
        for i, part in enumerate(content):
            param = f"messages[0].content[{i}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                refs.append(url)
                pieces.append(IMAGE)
            else:
                raise ClientError(400, f"{param}: expected a 'text' or 'image_url' part, got {kind!r}", param=param)
    else:
        raise ClientError(400, "messages[0].content must be a string or a list of parts", param="messages")
    check_image_count(len(refs), max_images)
    text = "".join(pieces)
    if text.count(IMAGE) != len(refs):
        raise ClientError(400, f"the text itself contains {IMAGE!r}; this server uses it as the image "
                          "placeholder, so it cannot appear in text parts", param="messages")
    max_tokens = body.max_completion_tokens or body.max_tokens or defaults.max_new_tokens
    if max_tokens > defaults.max_new_tokens:  # one long sampled reply would hold the single model thread
        raise ClientError(400, f"max_tokens {max_tokens} is above this server's limit of {defaults.max_new_tokens} "
                          "(tpru serve --max-new-tokens)", param="max_tokens", code="max_tokens_too_large")
    options = GenerationOptions(
        max_new_tokens=max_tokens,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        seed=defaults.seed if body.seed is None else body.seed,
    )
    return ChatCall(text, tuple(refs), prefill, options)


def _text_only(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ClientError(400, f"{param} must be text", param=param)


def build_question(spec: dict | None, text: str, n_images: int) -> Question:
    """The structured question the client sent (``tpru_question``), or a plain one around the chat text."""
    if spec is None:
        return Question(task="chat", problem=text, n_images=n_images, labels=())
    try:
        options = tuple(Option(str(letter), value) for letter, value in spec.get("options", []))
        question = Question(
            task=str(spec["task"]), problem=str(spec.get("problem", text)), n_images=int(spec["n_images"]),
            labels=tuple(str(x) for x in spec.get("labels", [])), options=options,
            context_steps=tuple(int(x) for x in spec.get("context_steps", [])),
            target_step=None if spec.get("target_step") is None else int(spec["target_step"]),
            description=spec.get("description"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ClientError(400, f"tpru_question is malformed ({type(exc).__name__}: {exc})",
                          param="tpru_question") from exc
    if question.n_images != n_images or len(options) > MAX_CANDIDATES + 2:
        raise ClientError(400, f"tpru_question describes {question.n_images} images but the message has "
                          f"{n_images}", param="tpru_question")
    return question


def completion(model: str, content: str, *, finish: str = "stop", logprobs: list | None = None,
               **extra: Any) -> dict:
    """A ``chat.completion`` object (non-streaming)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content},
              "logprobs": None if logprobs is None else {"content": logprobs}, "finish_reason": finish}
    body = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": None}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


__all__ = ["ChatBody", "ChatCall", "ClientError", "ScoreField", "build_question", "check_image_count",
           "completion", "count_images", "decode_image", "error_body", "image_bytes", "parse_chat"]
