"""Chat completions of ``tpru serve``: an OpenAI request -> a :class:`ChatCall`, and the response shapes back.

What the OpenAI contract asks and this server does not implement is refused with a 400 naming the fields
(:data:`UNSUPPORTED`), never silently ignored. Fields that only restate the default (``presence_penalty: 0``,
``n: 1``, ``response_format: {"type": "text"}``, an empty ``tools`` list) are accepted.

Example:
    >>> body = ChatBody(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    >>> parse_chat(body, GenerationOptions(max_new_tokens=64), max_images=4).turns
    (('system', 'Be brief.'), ('user', 'Hi'))
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from tpru_agent.engines.base import GenerationOptions
from tpru_agent.serve.bodies import ChatBody, check_image_count
from tpru_agent.serve.errors import ClientError
from tpru_agent.tasks.question import IMAGE

#: OpenAI fields this server does not implement -> the values that mean "not used" (those are accepted).
UNSUPPORTED: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None,),
    "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "best_of": (None, 1), "use_beam_search": (None, False), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,),
}
MAX_STOP = 8
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ChatCall:
    """A chat request reduced to what an engine needs.

    Attributes:
        turns: ``(role, text)`` with one ``<image>`` per image; the last turn is the user's.
        image_refs: the image references (data URLs / base64) in order.
        prefill: assistant text to continue (``continue_final_message``), else ``None``.
        options: decoding options.
        stop: stop sequences.
    """

    turns: tuple[tuple[str, str], ...]
    image_refs: tuple[str, ...]
    prefill: str | None
    options: GenerationOptions
    stop: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The last user turn."""
        return self.turns[-1][1]

    @property
    def single_turn(self) -> bool:
        return len(self.turns) == 1


def refuse_unsupported(body: ChatBody) -> None:
    """400 naming every field the request sets that this server does not implement."""
    extra = body.model_extra or {}
    bad = sorted(k for k, defaults in UNSUPPORTED.items() if k in extra and extra[k] not in defaults)
    hints = []
    if body.n not in (None, 1):
        bad.append("n")
        hints.append("n must be 1")
    if body.top_logprobs is not None and not body.logprobs:
        bad.append("top_logprobs (without logprobs: true)")
        hints.append("top_logprobs needs logprobs: true")
    if bad:
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ClientError(400, f"this server does not implement {', '.join(bad)}; remove them from the request"
                          f"{hint}", param=bad[0].split()[0], code="unsupported_parameter")


def parse_chat(body: ChatBody, defaults: GenerationOptions, *, max_images: int, max_logprobs: int = 20) -> ChatCall:
    """Messages (system, user and assistant turns; ``text`` and ``image_url`` parts) and decoding options.

    Raises:
        ClientError: unimplemented fields, a message layout the chat template cannot take, too many images,
            ``max_tokens`` above the server's limit.
    """
    refuse_unsupported(body)
    for field in ("top_logprobs", "prompt_logprobs"):
        if (getattr(body, field) or 0) > max_logprobs:
            raise ClientError(400, f"{field} is {getattr(body, field)}, above this server's limit of {max_logprobs} "
                              "(tpru serve --max-logprobs)", param=field)
    msgs, prefill = list(body.messages), None
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise ClientError(400, "continue_final_message needs add_generation_prompt: false (as in vLLM)",
                              param="add_generation_prompt")
        if not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
            raise ClientError(400, "continue_final_message needs the last message to be the assistant's",
                              param="messages")
        prefill = _text_only(msgs.pop().get("content"), f"messages[{len(msgs)}].content")
    turns, refs = _turns(msgs)
    check_image_count(len(refs), max_images)
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
    return ChatCall(turns, tuple(refs), prefill, options, _stops(body.stop))


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(not s or len(s) > 256 for s in stops):
        raise ClientError(400, f"stop takes at most {MAX_STOP} non-empty sequences of up to 256 characters",
                          param="stop")
    return tuple(stops)


def _turns(msgs: list) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """``(role, text)`` turns (leading system messages merged) and the image references, in order."""
    turns: list[tuple[str, str]] = []
    refs: list[str] = []
    for i, msg in enumerate(msgs):
        param = f"messages[{i}]"
        role = ROLES.get(msg.get("role")) if isinstance(msg, dict) else None
        if role is None:
            got = msg.get("role") if isinstance(msg, dict) else type(msg).__name__
            raise ClientError(400, f"{param}.role is {got!r}; this server takes system, developer, user and "
                              "assistant messages (no tools)", param=f"{param}.role")
        if role == "system" and any(r != "system" for r, _ in turns):
            raise ClientError(400, f"{param}: system messages come before the conversation", param=param)
        if role == "user":
            text, images = _user_content(msg.get("content"), f"{param}.content")
            refs += images
        else:
            text = _text_only(msg.get("content"), f"{param}.content")
        if role == "system" and turns:
            turns[-1] = ("system", turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ClientError(400, "the last message must be the user's (or the assistant's with "
                          "continue_final_message: true and add_generation_prompt: false)", param="messages")
    return tuple(turns), refs


def _user_content(content: Any, param: str) -> tuple[str, list[str]]:
    if isinstance(content, str):
        pieces, refs = [content], []
    elif isinstance(content, list):
        pieces, refs = [], []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                refs.append(url.get("url") if isinstance(url, dict) else url)
                pieces.append(IMAGE)
            else:
                raise ClientError(400, f"{param}[{i}]: expected a 'text' or 'image_url' part, got {kind!r}",
                                  param=f"{param}[{i}]")
    else:
        raise ClientError(400, f"{param} must be a string or a list of parts", param=param)
    text = "".join(pieces)
    if text.count(IMAGE) != len(refs):
        raise ClientError(400, f"{param}: the text itself contains {IMAGE!r}; this server uses it as the image "
                          "placeholder, so it cannot appear in text parts", param=param)
    return text, refs


def _text_only(content: Any, param: str) -> str:
    if isinstance(content, str):
        text = content
    elif isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                           and isinstance(p.get("text"), str) for p in content):
        text = "".join(p["text"] for p in content)
    else:
        raise ClientError(400, f"{param} must be text (images go in user messages)", param=param)
    if IMAGE in text:
        raise ClientError(400, f"{param} contains {IMAGE!r}, the server's image placeholder", param=param)
    return text


# ---------------------------------------------------------------------------------------------- responses
def usage(prompt: int, completion: int) -> dict:
    """OpenAI ``usage``."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(model: str, content: str, *, finish: str = "stop", logprobs: list | None = None,
               tokens: dict | None = None, **extra: Any) -> dict:
    """A ``chat.completion`` object (non-streaming); ``tokens`` is its ``usage`` (``None`` when uncounted)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content},
              "logprobs": None if logprobs is None else {"content": logprobs}, "finish_reason": finish}
    body = {"id": new_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": tokens}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chunk(cid: str, model: str, *, delta: dict | None = None, finish: str | None = None,
          tokens: dict | None = None) -> dict:
    """One ``chat.completion.chunk``: a delta, the final chunk (``finish``), or the usage chunk (no choices)."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if tokens is not None else [{"index": 0, "delta": delta or {}, "logprobs": None,
                                                       "finish_reason": finish}]}
    if tokens is not None:
        body["usage"] = tokens
    return body


__all__ = ["ChatCall", "UNSUPPORTED", "chunk", "completion", "new_id", "parse_chat", "refuse_unsupported", "usage"]
