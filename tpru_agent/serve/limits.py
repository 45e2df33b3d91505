"""What one request may cost: the context limit and the scoring limits, counted before the model runs.

A prompt is counted in tokens (images included) by the hf engine's tokenizer on the model thread, right before
the job would run; other engines count tokens only while they run (too late for a limit), so their text is
counted in UTF-8 bytes, an upper bound of its tokens (a byte-level BPE token covers at least one byte). Refusals are 400s that state the count and the
limit, as vLLM's do.

Example:
    >>> fit_context(900, requested=None, default_new=1024, limit=2048)
    1024
    >>> fit_context(1500, requested=None, default_new=1024, limit=2048)   # room left for 548 new tokens
    548
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tpru_agent.engines.hf_tokens import HFTokens
from tpru_agent.serve.errors import ClientError


@dataclass(frozen=True)
class Limits:
    """Per-request limits (``tpru serve --max-model-len``, ``--max-score-continuations``, ``--max-score-tokens``).

    Attributes:
        max_model_len: prompt + generated tokens; ``None``: the model's own maximum.
        max_score_continuations: most ``tpru_score`` continuations in one request.
        max_score_tokens: most continuation tokens in one ``tpru_score`` request (all continuations together).
    """

    max_model_len: int | None = None
    max_score_continuations: int = 64
    max_score_tokens: int = 8192


def context_limit(engine, limits: Limits) -> int:
    """The context limit in force for ``engine``: the flag, capped by the model's own maximum when known."""
    own = engine.max_context() if isinstance(engine, HFTokens) else None
    if limits.max_model_len is None:
        return own or 32768
    return min(limits.max_model_len, own) if own else limits.max_model_len


def fit_context(prompt: int, *, requested: int | None, default_new: int, limit: int, at_least: bool = False) -> int:
    """The generation budget for a counted prompt (as vLLM: the room left when ``max_tokens`` is not given).

    Raises:
        ClientError: the prompt alone reaches the limit, or prompt + ``requested`` exceeds it.
    """
    if prompt >= limit or (requested is not None and prompt + requested > limit):
        asked = f" + {requested} requested completion tokens" if requested is not None else ""
        raise ClientError(400, f"this model's context limit is {limit} tokens, but the request has "
                          f"{'at least ' if at_least else ''}{prompt} prompt tokens{asked}; shorten the messages or "
                          "send fewer images (tpru serve --max-model-len)", param="messages",
                          code="context_length_exceeded")
    return requested if requested is not None else min(default_new, limit - prompt)


def count_prompt(engine, turns: Sequence[tuple[str, str]], images: Sequence, *, reply: str, limit: int) -> int:
    """Prompt tokens (hf engine: exact, images included) or UTF-8 bytes of the text (other engines).

    A text too long to fit is refused without tokenizing it: no token is longer than the longest entry of the
    vocabulary, which gives a lower bound of its tokens.

    Raises:
        ClientError: that lower bound is over ``limit``.
    """
    if not isinstance(engine, HFTokens):
        return sum(len(text.encode()) for _, text in turns) + len(reply.encode())
    floor = len(engine.render(turns, reply=reply)) // engine.max_token_chars()
    if floor >= limit:
        fit_context(floor, requested=None, default_new=0, limit=limit, at_least=True)
    return engine.count_tokens(turns, images, reply=reply)


def check_score(engine, continuations: Sequence[str], prompt: int, limits: Limits, limit: int) -> None:
    """Refuse a ``tpru_score`` request over the continuation count, total continuation tokens or the context."""
    if len(continuations) > limits.max_score_continuations:
        raise ClientError(400, f"tpru_score has {len(continuations)} continuations; the limit is "
                          f"{limits.max_score_continuations} (tpru serve --max-score-continuations)",
                          param="tpru_score.continuations", code="too_many_continuations")
    if len(set(continuations)) != len(continuations):
        raise ClientError(400, "tpru_score.continuations must be distinct", param="tpru_score.continuations")
    hf = isinstance(engine, HFTokens)
    floor = sum(map(len, continuations)) // (engine.max_token_chars() if hf else 1)
    sizes = None if floor > limits.max_score_tokens else [  # too long to be worth tokenizing
        engine.text_tokens(c) if hf else len(c.encode()) for c in continuations]
    if sizes is None or sum(sizes) > limits.max_score_tokens:
        total = f"at least {floor}" if sizes is None else str(sum(sizes))
        raise ClientError(400, f"tpru_score.continuations hold {total} tokens together; the limit is "
                          f"{limits.max_score_tokens} (tpru serve --max-score-tokens)",
                          param="tpru_score.continuations", code="score_too_large")
    fit_context(prompt, requested=max(sizes), default_new=0, limit=limit)


__all__ = ["Limits", "check_score", "context_limit", "count_prompt", "fit_context"]
