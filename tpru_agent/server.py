"""``tpru serve``: a TPRU model behind an OpenAI-compatible HTTP API plus task routes (FastAPI + uvicorn).

Routes (JSON in, JSON out; every error is ``{"error": {"message", "type", "param", "code"}}``: 4xx for requests
the server refuses, 5xx for failures on its side, never a traceback):

- ``GET /health``: status, model, engine, queue depth, counters (no key needed).
- ``GET /v1/models``: the served name, ``owned_by: "tpru-agent"`` (how clients detect the extensions below).
- ``POST /v1/chat/completions``: one user turn with ``text`` and ``image_url`` parts (images as
  ``data:image/...;base64,`` URLs, at most ``--max-images``); ``max_tokens`` / ``max_completion_tokens``,
  ``temperature``, ``top_p``, ``seed`` (omitted: the server's defaults, greedy). Extensions:

  - ``"tpru_score": {"continuations": ["<answer>A</answer>", ...], "prefix": "<think>...</think>"}`` answers,
    without generating, ``"tpru_score": {"continuations": [...], "logprobs": [...]}``: each continuation's
    log-probability as the assistant reply after ``prefix``, from the served engine's own ``score`` (exact).
    ``choices[0].message.content`` is the most likely continuation.
  - ``"tpru_question"``: the structured question (``tpru_agent.engines.openai.question_payload``), so engines
    that read it (classic) answer chat requests too.
  - With an hf engine, vLLM's token-level fields work as in vLLM: ``logprobs`` + ``top_logprobs`` (of the
    generated tokens, re-scored by one teacher-forced pass), ``continue_final_message`` with
    ``add_generation_prompt: false`` (continue a prefilled assistant turn), ``prompt_logprobs`` and
    ``return_token_ids``.

- ``POST /v1/order`` ``{"frames": [img, ...], "description"?, "mode"?: "reason"|"fast"}``,
  ``POST /v1/next`` ``{"history": [...], "candidates": [...], "goal"?, "description"?, "mode"?, "none_position"?}``,
  ``POST /v1/previous`` ``{"later": [...], "candidates": [...], "description"?, "mode"?, "none_position"?}``,
  ``POST /v1/verify`` ``{"history": [...], "observation": img, "goal"?, "distractors"?, "description"?, "mode"?}``:
  the facade's result as ``to_dict()`` JSON. ``img`` is a data URL or bare base64 (never a path or a URL).
  A reason-mode answer that does not parse is a 422 (``type: "parse_error"``, the raw text in the message).

Safety: binds 127.0.0.1 unless told otherwise; ``--api-key`` (or ``TPRU_API_KEY``) requires
``Authorization: Bearer KEY`` on ``/v1/*``; bodies over ``--max-body-mb`` get 413; one model thread runs every
model call from a bounded queue (full: 503 + ``Retry-After``), batching concurrent generations.

Example:
    >>> from tpru_agent import TPRU
    >>> from tpru_agent.server import ServerConfig, create_app
    >>> app = create_app(TPRU("tpru-3b"), ServerConfig(api_key="secret"))   # doctest: +SKIP
    >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)        # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal

from .errors import ConfigError, EngineUnavailableError, FrameError, ParseError, TPRUError, require

log = logging.getLogger(__name__)

Mode = Literal["reason", "fast"]


@dataclass
class ServerConfig:
    """What ``tpru serve`` flags set.

    Attributes:
        host, port: where to listen (loopback by default).
        api_key: bearer token required on ``/v1/*`` (``None``: open).
        served_name: model name clients send and ``/v1/models`` lists (default: the model argument).
        max_body_bytes: largest request body (HTTP 413 above it).
        max_images: most images in one request.
        max_queue: most model jobs waiting (HTTP 503 above it).
        max_batch: most chat generations run as one engine batch.
        batch_wait_s: how long a lone generation waits for batch-mates.
        request_timeout_s: longest wait for a model job (HTTP 504 after it).
        max_logprobs: largest ``top_logprobs`` / ``prompt_logprobs`` accepted (vLLM's ``--max-logprobs``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_name: str | None = None
    max_body_bytes: int = 32 << 20
    max_images: int = 16
    max_queue: int = 256
    max_batch: int = 8
    batch_wait_s: float = 0.005
    request_timeout_s: float = 600.0
    max_logprobs: int = 20

    def __post_init__(self):
        for name in ("max_body_bytes", "max_images", "max_queue", "max_batch", "max_logprobs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.batch_wait_s < 0:
            raise ConfigError("ServerConfig.request_timeout_s must be > 0 and batch_wait_s >= 0")


def create_app(model, config: ServerConfig | None = None):
    """The ASGI app serving ``model`` (a :class:`tpru_agent.TPRU`, any engine). Run it with uvicorn.

    Raises:
        EngineUnavailableError: fastapi is not installed (extra ``serve``).
    """
    require("fastapi", "serve", what="tpru serve")
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from .server_chat import ClientError, error_body
    from .server_routes import add_routes
    from .server_worker import ModelWorker

    cfg = config or ServerConfig()
    served = cfg.served_name or model.model_name
    worker = ModelWorker(model.engine, max_queue=cfg.max_queue, max_batch=cfg.max_batch,
                         batch_wait_s=cfg.batch_wait_s)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)

    # No /docs, /redoc or /openapi.json: they would be served without the API key.
    app = FastAPI(title="tpru-agent", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.tpru, app.state.worker, app.state.config, app.state.served = model, worker, cfg, served
    app.state.started = time.time()
    app.add_middleware(LimitsMiddleware, max_body_bytes=cfg.max_body_bytes, api_key=cfg.api_key)

    @app.exception_handler(ClientError)
    async def client_error(_: HTTPRequest, exc: ClientError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, exc: RequestValidationError):
        return JSONResponse(validation_body(exc.errors()), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: HTTPRequest, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind=kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(_: HTTPRequest, exc: Exception):
        log.exception("unhandled error in a request")
        return JSONResponse(error_body("internal server error (details in the server log)", kind="server_error"),
                            status_code=500)

    add_routes(app)
    return app


async def run_model(app, call: Callable[[], Any] | None = None, *, submit: Callable[[], Any] | None = None) -> Any:
    """Queue ``call`` on the model thread (or queue a job with ``submit()``), await it, map failures to HTTP errors."""
    from .server_chat import ClientError
    from .server_worker import QueueFullError, WorkerClosedError

    try:
        fut = submit() if submit is not None else app.state.worker.submit(call)
    except QueueFullError as exc:
        raise ClientError(503, str(exc), kind="server_busy", code="queue_full", headers={"Retry-After": "1"}) from exc
    except WorkerClosedError as exc:
        raise ClientError(503, str(exc), kind="server_busy", code="shutting_down") from exc
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), app.state.config.request_timeout_s)
    except asyncio.TimeoutError as exc:
        fut.cancel()
        raise ClientError(504, f"the model did not answer within {app.state.config.request_timeout_s:.0f} s",
                          kind="timeout", code="timeout") from exc
    except ClientError:
        raise
    except (FrameError, ConfigError) as exc:
        raise ClientError(400, str(exc), code=type(exc).__name__) from exc
    except ParseError as exc:
        raise ClientError(422, str(exc), kind="parse_error", code="unparseable_model_output") from exc
    except WorkerClosedError as exc:
        raise ClientError(503, str(exc), kind="server_busy", code="shutting_down") from exc
    except EngineUnavailableError as exc:
        raise ClientError(503, str(exc), kind="server_error", code="engine_unavailable") from exc
    except TPRUError as exc:
        log.warning("model call failed: %s", exc)
        raise ClientError(502, f"{type(exc).__name__}: {exc}", kind="server_error", code="engine_error") from exc


def validation_body(errors: list[dict]) -> dict:
    """A readable 400 body from pydantic errors (malformed JSON included)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return _error("the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", "")),
                      code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",):
        return _error("the request body must be one JSON object (sent with Content-Type: application/json)",
                      code="invalid_json")
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return _error(f"{loc or 'body'}: {first.get('msg', 'invalid')}{more}", param=loc or None, code="invalid_field")


def _error(message: str, **kw) -> dict:
    from .server_chat import error_body

    return error_body(message, **kw)


class LimitsMiddleware:
    """ASGI middleware: bearer token on ``/v1/*`` and a body-size cap (checked on the header and while reading)."""

    def __init__(self, app, *, max_body_bytes: int, api_key: str | None):
        self.app = app
        self.max_body = max_body_bytes
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key is not None and scope.get("path", "").startswith("/v1"):
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.key):
                return await _send_json(send, 401, _error(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' (the key given to tpru serve "
                    "--api-key / TPRU_API_KEY)", kind="authentication_error", code="invalid_api_key"),
                    {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _send_json(send, 413, self._too_big())
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _send_json(send, 413, self._too_big())
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _too_big(self) -> dict:
        mb = self.max_body / (1 << 20)
        return _error(f"request body larger than {mb:g} MB (tpru serve --max-body-mb); send fewer or smaller images",
                      code="body_too_large")


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _version() -> str:
    from . import __version__

    return __version__


def finite(values: list[float]) -> list[float]:
    """JSON has no infinities: a ``-inf`` log-prob (probability 0) is sent as -1e30, NaN as an error."""
    out = []
    for v in values:
        v = float(v)
        if math.isnan(v):
            raise TPRUError("the engine returned NaN log-probs (numerical overflow; try dtype='fp32')")
        out.append(max(v, -1e30) if v != math.inf else 1e30)
    return out


__all__ = ["LimitsMiddleware", "Mode", "ServerConfig", "create_app", "finite", "run_model", "validation_body"]
