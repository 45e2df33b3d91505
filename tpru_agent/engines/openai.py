"""Any OpenAI-compatible server as an engine: ``tpru serve`` (this package) or vLLM.

``generate`` sends one chat completion per request (images as PNG data URLs, one ``image_url`` part per
``<image>`` placeholder, in order). ``score`` needs log-probabilities; three methods, picked per server:

- ``"tpru"`` (``tpru serve``): the ``tpru_score`` request field (see :mod:`tpru_agent.serve`) returns each
  continuation's exact log-probability from the served engine's own ``score``: identical numbers to running the
  engine locally. Detected from ``GET /v1/models`` (``owned_by: "tpru-agent"``).
- ``"top_logprobs"`` (vLLM; single-letter answers): one request whose assistant turn is prefilled up to the
  answer (``continue_final_message: true, add_generation_prompt: false``), ``max_tokens: 1``, ``logprobs: true``,
  ``top_logprobs: 20``; each option's value is the log-prob of the first token that only its continuation starts
  with. The prefill is cut at a Qwen pre-token boundary: Qwen glues ``>A`` into one token, so the prefill ends with
  ``<answer`` (not ``<answer>``) and the options are read from the tokens ``>A``, ``>B``, ... An option missing from
  the top list gets the lowest listed log-prob (an upper bound).
- ``"prompt_logprobs"`` (vLLM; any answer, e.g. ``CABD`` permutations): one request per continuation with the whole
  continuation prefilled, ``max_tokens: 1``, ``prompt_logprobs: 0``, ``return_token_ids: true``; the value is the
  sum of the log-probs of the prompt tokens that overlap the continuation (vLLM's prefix cache makes the shared
  prompt cheap). Exact up to a term shared by every continuation.

``"auto"`` (default) uses ``tpru`` on ``tpru serve``, else ``top_logprobs`` for single-letter answers and
``prompt_logprobs`` otherwise (also when ``top_logprobs`` finds no option token). What a server must support:
``generate`` needs only chat completions with ``image_url`` parts. ``score`` needs, on ``tpru serve``, nothing
more; elsewhere the vLLM chat fields ``continue_final_message`` / ``add_generation_prompt``, ``logprobs`` /
``top_logprobs`` (``--max-logprobs`` >= 20, vLLM's default) and, for answers longer than one token,
``prompt_logprobs`` and ``return_token_ids``. A server without prefilled assistant turns cannot score: serve the
model with ``tpru serve`` instead (it also answers the vLLM fields above when its engine is hf).

Serving TPRU-3B with vLLM for this engine (images at the TPRU pixel budget, up to 7 per prompt)::

    vllm serve Stephengzk/TPRU-3B --served-model-name tpru-3b \\
        --limit-mm-per-prompt '{"image": 7, "video": 0}' \\
        --mm-processor-kwargs '{"min_pixels": 3136, "max_pixels": 65536}' \\
        --max-model-len 8192 --host 127.0.0.1 --port 8000

    # then, in Python:
    TPRU("tpru-3b", engine="openai", base_url="http://127.0.0.1:8000/v1").order_frames(frames, mode="fast")

Current vLLM reads ``--limit-mm-per-prompt`` as JSON (or dotted: ``--limit-mm-per-prompt.image 7``); the old
``image=7`` form was deprecated in 2025 and is now rejected. The SDK sends frames already sized as TPRU's training
sized them (``tpru_agent.sizing.budget_size``: 224x224 -> 196x196, ~49 visual tokens), so vLLM's processor must only
round them: ``min_pixels`` 3136 and ``max_pixels`` 65536 lie outside every SDK-sized frame (TPRU's own 16384..36864
there would shrink a 196x196 frame to 168x168 a second time), and still let vLLM's memory profiling reserve space for
7 small images instead of a few huge ones
(Qwen2.5-VL's processor default allows ~16k tokens per image); ``"video": 0`` skips reserving video memory.
``tpru serve`` is the same API for one process without vLLM (``tpru serve --model tpru-3b``).

Example:
    >>> from tpru_agent import TPRU
    >>> model = TPRU("tpru-3b", engine="openai", base_url="http://127.0.0.1:8000/v1")   # doctest: +SKIP
    >>> model.verify_step(history, frame, mode="fast").confidence                         # doctest: +SKIP
    0.93
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from tpru_agent.engines.base import Engine, GenerationOptions, Request, distinct, no_quantization, only_auto
from tpru_agent.engines.openai_protocol import (
    ServerError,
    continuation_logprob,
    error_message,
    first_pretoken,
    generation_retry_delay,
    image_data_url,
    match_top_logprobs,
    message_text,
    normalize_base_url,
    prefill_split,
    pretoken_split,
    question_payload,
    user_content,
)
from tpru_agent.errors import (
    ConfigError,
    EngineClosedError,
    EngineUnavailableError,
    ModelNotFoundError,
    TPRUError,
    close_matches,
    require,
)

log = logging.getLogger(__name__)

SCORE_METHODS = ("auto", "tpru", "top_logprobs", "prompt_logprobs")
#: ``owned_by`` of the models ``tpru serve`` lists; how the engine knows it may send ``tpru_score``.
TPRU_OWNER = "tpru-agent"
#: Chat-completion fields the ``openai`` client takes as arguments; every other field goes in ``extra_body``.
_CHAT_ARGS = frozenset({"model", "messages", "max_tokens", "temperature", "top_p", "seed", "logprobs",
                        "top_logprobs"})
_START = ("start one with `tpru serve --model tpru-3b --port {port}` (or vLLM, see tpru_agent.engines.openai) "
          "or fix base_url")


class OpenAIEngine(Engine):
    """Engine over an OpenAI-compatible HTTP server, through the official ``openai`` client (its transport, retries
    and errors; the errors are raised again as this package's typed ones).

    Token usage: each chat completion's ``usage`` is added to the engine's count (``take_usage``), scoring requests
    included (their prompt tokens only). The OpenAI schema does not split out image tokens: ``prompt_tokens``
    includes them and ``image_tokens`` stays 0.

    Args:
        model: the served model name (``tpru serve --served-model-name`` / ``vllm serve --served-model-name``);
            ``None`` takes the first model the server lists.
        base_url: server URL, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added to a bare host).
        api_key: bearer token; defaults to the ``TPRU_API_KEY`` environment variable. ``OPENAI_API_KEY`` is
            deliberately not read, so a real OpenAI key is never sent to another server.
        timeout: seconds per HTTP request (generation of a long chain of thought can take minutes).
        score_method: ``"auto"``, ``"tpru"``, ``"top_logprobs"`` or ``"prompt_logprobs"`` (see the module doc).
        top_logprobs: how many alternatives the ``top_logprobs`` method asks for (vLLM and ``tpru serve`` allow
            up to 20 unless started with a larger ``--max-logprobs``).
        image_format: ``"png"`` (lossless, default) or ``"jpeg"`` (smaller uploads, slightly different pixels).
        concurrency: requests in flight at once for batched ``generate`` and ``prompt_logprobs`` scoring.
        max_retries: retries of one request on connection errors, timeouts and HTTP 408 / 409 / 429 / 5xx
            (the ``openai`` client's: exponential back-off, honouring ``Retry-After``). A generation that timed
            out is not sent again (the server may still be decoding it, so a resend could cost ``timeout`` per
            try); its other failures are retried alike.
        headers: extra HTTP headers sent with every request.
        device, dtype: ``"auto"`` only; the server chooses them (``tpru serve --device``, vLLM's ``--dtype``).
        quantization: ``None`` only; quantise on the server side.
        min_pixels, max_pixels: the budget the facade sizes frames at before sending them (``engine.budget``).

    Raises:
        EngineUnavailableError: the ``openai`` package (extra ``serve``) is not installed.
        ConfigError: a bad option value, or a device / dtype / quantization (the server's to choose).
    """

    name = "openai"

    def __init__(self, model: str | None = None, *, base_url: str = "http://127.0.0.1:8000/v1",
                 api_key: str | None = None, timeout: float = 600.0, score_method: str = "auto",
                 top_logprobs: int = 20, image_format: str = "png", concurrency: int = 8, max_retries: int = 2,
                 headers: dict[str, str] | None = None, device: str = "auto", dtype: str = "auto",
                 quantization: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None):
        no_quantization(quantization)
        for option, value in (("device", device), ("dtype", dtype)):
            only_auto(option, value, "openai", "the server chooses it (tpru serve --device; vLLM --dtype)")
        if min_pixels is not None or max_pixels is not None:
            from tpru_agent.sizing import serving_budget

            self.budget = serving_budget(None, min_pixels, max_pixels)
        openai = require("openai", "serve", what="the openai engine")
        if score_method not in SCORE_METHODS:
            raise ConfigError(f"score_method must be one of {SCORE_METHODS}, got {score_method!r}")
        if image_format not in ("png", "jpeg"):
            raise ConfigError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
        if top_logprobs < 1 or concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ConfigError("need top_logprobs >= 1, concurrency >= 1, max_retries >= 0 and timeout > 0")
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.score_method = score_method
        self.top_logprobs = top_logprobs
        self.image_format = image_format
        self.max_retries = max_retries
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get("TPRU_API_KEY")
        headers = dict(headers or {})
        # No key: the client still wants one, so give it a placeholder and leave the header out of every request.
        # The client would also send OPENAI_ORG_ID / OPENAI_PROJECT_ID from the environment to any server: never.
        given = {h.lower() for h in headers}
        omit = [h for h in ("OpenAI-Organization", "OpenAI-Project") if h.lower() not in given]
        if not key and "authorization" not in given:
            omit.append("Authorization")
        self._extra_headers = {h: openai.Omit() for h in omit}
        self._openai = openai
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key or "unused", timeout=timeout,
                                     max_retries=max_retries, default_headers=headers or None)
        self._once = self._client.with_options(max_retries=0)  # generations: retried below, timeouts excepted
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="tpru-openai")
        self._lock = threading.Lock()
        self._models: list[dict] | None = None
        self._closed = False

    def _live(self) -> None:
        if self._closed:
            raise EngineClosedError(f"this OpenAIEngine ({self.base_url}) was closed; create a new one")

    # ------------------------------------------------------------------ HTTP
    def _call(self, what: str, method, **kwargs: Any) -> Any:
        """``method(**kwargs)`` of the ``openai`` client, its errors raised as this package's typed errors."""
        self._live()
        try:
            return method(extra_headers=self._extra_headers, **kwargs)
        except self._openai.APIError as exc:
            raise self._typed_error(exc, what) from exc

    def _typed_error(self, exc: Exception, what: str) -> Exception:
        openai = self._openai
        start = _START.format(port=urlsplit(self.base_url).port or 8000)
        if isinstance(exc, openai.APITimeoutError):
            return EngineUnavailableError(
                f"{what} on {self.base_url} timed out after {self.timeout:g} s per try (a generation is tried "
                f"once, anything else up to {self.max_retries + 1} times); raise timeout= for long generations, "
                f"or check the server is up: {start}")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return EngineUnavailableError(
                f"cannot reach the server at {self.base_url} ({type(cause).__name__}: {cause}; tried "
                f"{self.max_retries + 1} times); {start}")
        if not isinstance(exc, openai.APIStatusError):  # e.g. a response body the client cannot read
            return ServerError(f"{what} on {self.base_url}: {exc}")
        message = error_message(exc.body) or exc.message
        where = f"{what} on {self.base_url} answered HTTP {exc.status_code}: {message}"
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return ConfigError(f"{where}. Pass api_key= (or set TPRU_API_KEY) to the server's key; OPENAI_API_KEY "
                               "is not read, so a real OpenAI key is never sent to another server")
        if isinstance(exc, openai.NotFoundError) and what != "GET /models" and "model" in message.lower():
            return ModelNotFoundError(f"{where}.{self._served_hint()}")
        if isinstance(exc, (openai.BadRequestError, openai.UnprocessableEntityError)) or exc.status_code == 413:
            return ConfigError(where)
        return ServerError(where, status=exc.status_code, body=exc.body)

    def _served_hint(self) -> str:
        """`` Served models: [...]`` plus a close match of ``model``, or nothing when the listing fails."""
        try:
            served = self.served_models()
        except TPRUError:  # only a hint inside another error's message
            return ""
        return f" Served models: {served}." + close_matches(str(self.model), served) if served else ""

    def _chat(self, payload: dict, *, scoring: bool = True) -> dict:
        """One chat completion as a plain dict (server extensions included). Scoring requests use the client's
        retries; a generation is retried here on the same failures except a timeout (see ``max_retries``)."""
        args = {k: v for k, v in payload.items() if k in _CHAT_ARGS}
        extra = {k: v for k, v in payload.items() if k not in _CHAT_ARGS}
        if scoring:
            return self._call("POST /chat/completions", self._client.chat.completions.create, **args,
                              extra_body=extra or None).to_dict()
        openai, attempt = self._openai, 0
        while True:
            try:
                return self._call("POST /chat/completions", self._once.chat.completions.create, **args,
                                  extra_body=extra or None).to_dict()
            except TPRUError as exc:
                delay = generation_retry_delay(exc.__cause__, openai, attempt)
                if delay is None or attempt >= self.max_retries:
                    raise
                attempt += 1
                time.sleep(delay)

    def _chats(self, items: Sequence, payload: Callable[[Any], dict], *, scoring: bool) -> list[dict]:
        """One chat completion per item, sent concurrently; usage counted here, on the calling thread (it is
        per thread, see :meth:`Engine.take_usage`)."""
        bodies = [self._chat(payload(items[0]), scoring=scoring)] if len(items) == 1 else list(
            self._pool.map(lambda item: self._chat(payload(item), scoring=scoring), items))
        for body in bodies:
            self._count(body, scoring=scoring)
        return bodies

    def _count(self, body: dict, *, scoring: bool) -> None:
        """Add a reply's ``usage``: image tokens are inside ``prompt_tokens`` (the schema does not split them out);
        the one token a server decodes to answer a scoring request is not counted (scoring generates nothing)."""
        usage = body.get("usage")
        if isinstance(usage, dict):
            self._add_usage(prompt=usage.get("prompt_tokens") or 0,
                            generated=0 if scoring else usage.get("completion_tokens") or 0)

    # ------------------------------------------------------------------ server facts
    def _listing(self) -> list[dict]:
        with self._lock:
            if self._models is None:
                try:
                    page = self._call("GET /models", self._client.models.list)
                    self._models = [m.to_dict() for m in page.data]
                except ServerError:  # a server without /models: nothing known, not fatal
                    self._models = []
            return self._models

    def served_models(self) -> list[str]:
        """Model names the server lists (``GET /v1/models``)."""
        return [str(m.get("id")) for m in self._listing()]

    def is_tpru_server(self) -> bool:
        """True when the server is ``tpru serve`` (it answers the ``tpru_score`` extension)."""
        return any(m.get("owned_by") == TPRU_OWNER for m in self._listing())

    def _model_name(self) -> str:
        if self.model is None:
            names = self.served_models()
            if not names:
                raise ConfigError(f"no model name given and {self.base_url}/models lists none; pass model=")
            self.model = names[0]
        return self.model

    # ------------------------------------------------------------------ payloads
    def _payload(self, request: Request, assistant: str | None = None, **fields: Any) -> dict:
        messages: list[dict] = [{"role": "user", "content": user_content(request, fmt=self.image_format)}]
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
            fields.update(continue_final_message=True, add_generation_prompt=False)
        payload = {"model": self._model_name(), "messages": messages, **fields}
        if self.is_tpru_server():
            payload["tpru_question"] = question_payload(request.question)
        return {k: v for k, v in payload.items() if v is not None}

    # ------------------------------------------------------------------ generate
    def generate(self, requests: Sequence[Request], options: GenerationOptions = GenerationOptions()) -> list[str]:
        """One chat completion per request, sent concurrently; the assistant text of each."""
        self._live()
        bodies = self._chats(requests, lambda request: self._payload(
            request, max_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
            seed=options.seed), scoring=False)
        return [message_text(body) for body in bodies]

    # ------------------------------------------------------------------ score
    def score(self, request: Request, continuations: Sequence[str], *, prefix: str = "") -> list[float]:
        """Log-probability of each continuation after ``prefix`` (see the module doc for the three methods)."""
        self._live()
        conts = distinct(continuations)
        if not conts:
            return []
        method = self.score_method
        if method == "auto":
            method = "tpru" if self.is_tpru_server() else self._fallback_method(conts, prefix)
        if method == "tpru":
            return self._score_tpru(request, conts, prefix)
        if method == "top_logprobs":
            values = self._score_top(request, conts, prefix)
            if values is not None:
                return values
            if self.score_method == "top_logprobs":
                raise ServerError("no option token appeared among the top log-probs: the answers do not start "
                                  "with distinct single tokens here; use score_method='prompt_logprobs'")
            log.debug("top_logprobs found no option token; falling back to prompt_logprobs")
        return self._score_prompt(request, conts, prefix)

    @staticmethod
    def _fallback_method(conts: list[str], prefix: str) -> str:
        split = prefill_split(conts, prefix)
        # A short distinguishing pre-token (">A") is one token in Qwen's vocabulary; permutations are not.
        longest = max(len(first_pretoken((prefix + c)[split:])) for c in conts)
        return "top_logprobs" if len(conts) > 1 and longest <= 3 else "prompt_logprobs"

    def _score_tpru(self, request: Request, conts: list[str], prefix: str) -> list[float]:
        body = self._chat(self._payload(
            request, max_tokens=1, tpru_score={"continuations": conts, "prefix": prefix}))
        self._count(body, scoring=True)
        values = (body.get("tpru_score") or {}).get("logprobs")
        if not isinstance(values, list) or len(values) != len(conts):
            raise ServerError(f"{self.base_url} did not answer tpru_score (is it `tpru serve`?); use "
                              "score_method='auto'", body=body)
        return [float(v) for v in values]

    def _score_top(self, request: Request, conts: list[str], prefix: str) -> list[float] | None:
        split = prefill_split(conts, prefix)
        fill = (prefix + conts[0])[:split]
        body = self._chat(self._payload(
            request, assistant=fill, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=self.top_logprobs))
        self._count(body, scoring=True)
        try:
            first = body["choices"][0]["logprobs"]["content"][0]
            top = [(str(t["token"]), float(t["logprob"])) for t in first["top_logprobs"]]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ServerError(f"{self.base_url} answered no top_logprobs ({exc}); does it support logprobs with "
                              "continue_final_message?", body=body) from exc
        values = match_top_logprobs([(prefix + c)[split:] for c in conts], top)
        if all(v is None for v in values):
            return None
        floor = min(lp for _, lp in top)
        return [floor if v is None else v for v in values]

    def _score_prompt(self, request: Request, conts: list[str], prefix: str) -> list[float]:
        bodies = self._chats(conts, lambda cont: self._payload(
            request, assistant=prefix + cont, max_tokens=1, temperature=0.0, prompt_logprobs=0,
            return_token_ids=True), scoring=True)
        values = []
        for cont, body in zip(conts, bodies):
            plp = body.get("prompt_logprobs")
            if not isinstance(plp, list):
                raise ServerError(f"{self.base_url} answered no prompt_logprobs; the prompt_logprobs method needs "
                                  "vLLM (or tpru serve)", body=body)
            values.append(continuation_logprob(plp, body.get("prompt_token_ids"), len(cont)))
        return values

    # ------------------------------------------------------------------ lifecycle
    def info(self) -> dict:
        """Server URL, model name and the score method in use."""
        return {"engine": self.name, "base_url": self.base_url, "model": self.model,
                "score_method": self.score_method, "tpru_server": self.is_tpru_server()}

    def close(self) -> None:
        """Close the client's connections and the request threads; later calls raise :class:`EngineClosedError`."""
        self._closed = True
        self._pool.shutdown(wait=False)
        self._client.close()

    def __repr__(self) -> str:
        return f"OpenAIEngine(model={self.model!r}, base_url={self.base_url!r})"


__all__ = ["OpenAIEngine", "SCORE_METHODS", "ServerError", "continuation_logprob", "image_data_url",
           "match_top_logprobs", "normalize_base_url", "pretoken_split", "question_payload", "user_content"]

