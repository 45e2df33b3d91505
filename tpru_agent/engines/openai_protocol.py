"""Wire format of the openai engine: chat payloads with data-URL images, and reading log-probs back (pure code).

Kept apart from the engine so the parsing of vLLM / OpenAI log-prob shapes is tested with tables of raw values.
"""

from __future__ import annotations

import base64
import io
import math
import re
from typing import Any, Sequence
from urllib.parse import urlsplit

from tpru_agent.engines.base import Request
from tpru_agent.errors import ConfigError, TPRUError
from tpru_agent.tasks.question import Question, split_images

# Qwen2's pre-tokenizer split (transformers' PRETOKENIZE_REGEX) with \p{L} / \p{N} spelled for Python's re.
_PRETOKEN = re.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d| ?(?:[^\s\w]|_)+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class ServerError(TPRUError, RuntimeError):
    """The server answered with an error, or with a body this engine cannot read. ``status`` / ``body`` kept."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None):
        self.status = status
        self.body = body
        super().__init__(message)


def image_data_url(image, *, fmt: str = "png", quality: int = 90) -> str:
    """A PIL image as a ``data:image/...;base64,`` URL (PNG is lossless: the server sees the same pixels)."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG", compress_level=1)
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def question_payload(question: Question) -> dict:
    """The structured question as JSON (``tpru serve`` rebuilds it, so engines that read it, e.g. classic, work)."""
    return {"task": question.task, "problem": question.problem, "n_images": question.n_images,
            "labels": list(question.labels), "options": [[o.letter, o.value] for o in question.options],
            "context_steps": list(question.context_steps), "target_step": question.target_step,
            "description": question.description}


def user_content(request: Request, *, fmt: str = "png") -> list[dict]:
    """OpenAI content parts: text pieces with one ``image_url`` part at each ``<image>`` placeholder."""
    pieces = split_images(request.text, len(request.images))
    parts: list[dict] = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(request.images):
            parts.append({"type": "image_url", "image_url": {"url": image_data_url(request.images[i], fmt=fmt)}})
    return parts


def pretoken_split(text: str, at: int) -> int:
    """Start of the Qwen pre-token that contains character ``at`` of ``text`` (``at`` itself at a boundary)."""
    for match in _PRETOKEN.finditer(text):
        if match.start() <= at < match.end():
            return match.start()
    return at


def common_prefix(texts: Sequence[str]) -> int:
    """Length of the longest character prefix every text shares."""
    first = texts[0]
    n = min(len(t) for t in texts)
    for i in range(n):
        if any(t[i] != first[i] for t in texts[1:]):
            return i
    return n


def match_top_logprobs(remainders: Sequence[str], top: Sequence[tuple[str, float]]) -> list[float | None]:
    """Log-prob of each remainder's first token, read from one position's top list.

    A listed token counts for a remainder when the remainder starts with it and no other remainder does (tokens
    shared by several remainders say nothing about which one follows). Several such tokens add up (log-sum-exp).

    Example:
        >>> match_top_logprobs([">A</answer>", ">B</answer>"], [(">B", -0.1), (">", -3.0), (">A", -2.5)])
        [-2.5, -0.1]
    """
    out: list[float | None] = []
    for i, rem in enumerate(remainders):
        hits = [lp for tok, lp in top if tok and rem.startswith(tok)
                and not any(other.startswith(tok) for j, other in enumerate(remainders) if j != i)]
        out.append(None if not hits else max(hits) + math.log(sum(math.exp(h - max(hits)) for h in hits)))
    return out


def continuation_logprob(prompt_logprobs: list, token_ids: list[int] | None, n_chars: int) -> float:
    """Sum of the log-probs of the trailing prompt tokens that cover the last ``n_chars`` characters (vLLM shape).

    ``prompt_logprobs`` is vLLM's list (``None`` first, then ``{token_id: {"logprob", "rank", "decoded_token"}}``
    per prompt token); ``token_ids`` picks the prompt token out of each entry when an entry lists several.
    """
    total, covered = 0.0, 0
    for pos in range(len(prompt_logprobs) - 1, -1, -1):
        if covered >= n_chars:
            break
        entry = prompt_logprobs[pos]
        if not entry:
            raise ServerError(f"prompt_logprobs has no entry at position {pos}: the continuation covers the whole "
                              "prompt", body=None)
        if token_ids is not None and str(token_ids[pos]) in entry:
            item = entry[str(token_ids[pos])]
        elif len(entry) == 1:
            item = next(iter(entry.values()))
        else:
            raise ServerError("prompt_logprobs lists several tokens per position and no prompt_token_ids came "
                              "back; the server must support return_token_ids (vLLM >= 0.10)")
        total += float(item["logprob"])
        covered += len(item.get("decoded_token") or "")
    if covered < n_chars:
        raise ServerError(f"prompt_logprobs cover {covered} characters, fewer than the continuation's {n_chars}")
    return total


def normalize_base_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept (without a trailing ``/``)."""
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"base_url must be an http(s) URL like http://127.0.0.1:8000/v1, got {url!r}")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path or '/v1'}"


def prefill_split(conts: list[str], prefix: str) -> int:
    """Where the prefill ends: the start of the pre-token in which the continuations first differ."""
    at = len(prefix) + common_prefix(conts)
    return min(pretoken_split(prefix + c, at) for c in conts)


def first_pretoken(text: str) -> str:
    match = _PRETOKEN.match(text)
    return match.group(0) if match else text


def message_text(body: dict) -> str:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ServerError(f"the chat completion has no choices[0].message.content ({exc})", body=body) from exc
    return content or ""


def error_message(body: Any) -> str:
    """The server's message in an error body (OpenAI's ``error.message``, FastAPI's ``detail``, plain text)."""
    if isinstance(body, str):
        return body.strip()[:300]
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    return ""


def generation_retry_delay(cause, openai, attempt: int) -> float | None:
    """Seconds to wait before sending a failed generation again, or ``None`` not to: never after a timeout (the
    server may still be decoding it); as the ``openai`` client decides otherwise (connection errors and HTTP 408 /
    409 / 429 / 5xx, unless the server says ``x-should-retry: false``; ``Retry-After`` honoured up to a minute)."""
    if isinstance(cause, openai.APITimeoutError):
        return None
    backoff = min(8.0, 0.5 * 2 ** attempt)
    if isinstance(cause, openai.APIConnectionError):
        return backoff
    if not isinstance(cause, openai.APIStatusError):
        return None
    headers = cause.response.headers
    should = headers.get("x-should-retry")
    if should in ("true", "false"):
        return backoff if should == "true" else None
    if cause.status_code not in (408, 409, 429) and cause.status_code < 500:
        return None
    try:
        after = float(headers.get("retry-after-ms", "")) / 1000 if headers.get("retry-after-ms") else float(
            headers.get("retry-after", ""))
    except ValueError:
        return backoff
    return after if 0 <= after <= 60 else backoff


__all__ = ["generation_retry_delay", "ServerError", "common_prefix", "continuation_logprob", "error_message", "first_pretoken",
           "image_data_url", "match_top_logprobs", "message_text", "normalize_base_url", "pretoken_split",
           "prefill_split", "question_payload", "user_content"]
