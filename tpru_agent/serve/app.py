"""The ``tpru serve`` application: configuration, the app factory, and the middleware in front of every route.

Example:
    >>> from tpru_agent import TPRU
    >>> from tpru_agent.serve import ServerConfig, create_app
    >>> app = create_app(TPRU("tpru-3b"), ServerConfig(api_key="secret", max_model_len=8192))   # doctest: +SKIP
    >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)                          # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tpru_agent.errors import ConfigError, require
from tpru_agent.serve.errors import ClientError, error_body, validation_body
from tpru_agent.serve.limits import Limits, context_limit

log = logging.getLogger(__name__)
_GONE = object()


@dataclass
class ServerConfig:
    """What ``tpru serve`` flags set.

    Attributes:
        host, port: where to listen (loopback by default).
        api_key: bearer token required on ``/v1/*`` (``None``: open).
        served_name: model name clients send and ``/v1/models`` lists (default: the model's folder name or its
            Hub id / alias; a local path is never shown).
        max_body_bytes: largest request body (HTTP 413 above it).
        max_images: most images in one request.
        max_queue: most model jobs waiting (HTTP 503 above it).
        max_batch: most chat generations run as one engine batch (engines without token access).
        batch_wait_s: how long a lone generation waits for batch-mates.
        request_timeout_s: longest a request may take (HTTP 504 after it; a running generation stops).
        max_logprobs: largest ``top_logprobs`` / ``prompt_logprobs`` accepted (vLLM's ``--max-logprobs``).
        max_model_len: context limit in tokens, prompt + generation (vLLM's ``--max-model-len``); ``None``: the
            model's own maximum.
        max_score_continuations, max_score_tokens: ``tpru_score`` limits (count; tokens of all continuations).
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
    max_model_len: int | None = None
    max_score_continuations: int = 64
    max_score_tokens: int = 8192

    def __post_init__(self):
        for name in ("max_body_bytes", "max_images", "max_queue", "max_batch", "max_logprobs",
                     "max_score_continuations", "max_score_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ConfigError(f"ServerConfig.max_model_len must be >= 16 tokens, got {self.max_model_len}")
        if self.request_timeout_s <= 0 or self.batch_wait_s < 0:
            raise ConfigError("ServerConfig.request_timeout_s must be > 0 and batch_wait_s >= 0")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_model_len, self.max_score_continuations, self.max_score_tokens)


def served_name(model_name: str) -> str:
    """The name a model is served under: a local folder's base name, else the name given (alias or Hub id)."""
    path = Path(model_name).expanduser()
    return path.resolve().name if path.exists() else model_name


def _scrubber(model, served: str):
    """Replaces the model's local paths with its served name in any message sent to a client."""
    paths = {model.model_name}
    try:
        paths.add(str(model.info().get("model", "")))
    except Exception:  # noqa: BLE001 - info is optional facts; a failure only means less to scrub
        pass
    path = Path(model.model_name).expanduser()
    if path.exists():
        paths.add(str(path.resolve()))
    paths = sorted((p for p in paths if p and p != served and ("/" in p or "\\" in p)), key=len, reverse=True)

    def scrub(text: str) -> str:
        for p in paths:
            text = text.replace(p, served)
        return text

    return scrub


def create_app(model, config: ServerConfig | None = None):
    """The ASGI app serving ``model`` (a :class:`tpru_agent.TPRU`, any engine). Run it with uvicorn.

    Raises:
        EngineUnavailableError: fastapi is not installed (extra ``serve``).
    """
    require("fastapi", "serve", what="tpru serve")
    from fastapi import FastAPI

    from tpru_agent.serve.routes import add_routes
    from tpru_agent.serve.worker import ModelWorker

    cfg = config or ServerConfig()
    worker = ModelWorker(model.engine, max_queue=cfg.max_queue, max_batch=cfg.max_batch,
                         batch_wait_s=cfg.batch_wait_s)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)

    # No /docs, /redoc or /openapi.json: they would be served without the API key.
    app = FastAPI(title="tpru-agent", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    state = app.state
    state.tpru, state.worker, state.config, state.limits = model, worker, cfg, cfg.limits
    state.served = cfg.served_name or served_name(model.model_name)
    state.names = {state.served, model.model_name, Path(model.model_name).name}
    state.scrub = _scrubber(model, state.served)
    state.context_limit = context_limit(model.engine, cfg.limits)
    state.started = time.time()
    app.add_middleware(LimitsMiddleware, max_body_bytes=cfg.max_body_bytes, api_key=cfg.api_key)
    _add_handlers(app, state)
    add_routes(app)
    return app


def _add_handlers(app, state) -> None:
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ClientError)
    async def client_error(_: HTTPRequest, exc: ClientError):
        return JSONResponse(error_body(state.scrub(exc.message), kind=exc.kind, param=exc.param, code=exc.code),
                            status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, exc: RequestValidationError):
        return JSONResponse(validation_body(exc.errors()), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: HTTPRequest, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind=kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


class LimitsMiddleware:
    """ASGI middleware: bearer token on ``/v1/*``, a body-size cap (checked on the header and while reading), and
    a last-resort 500 for a crash.

    The crash handler lives here rather than in ``exception_handler(Exception)``: Starlette re-raises after that
    handler, so uvicorn logs a second traceback and drops the keep-alive connection the next request would use.
    """

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
                return await _send_json(send, 401, error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' (the key given to tpru serve "
                    "--api-key / TPRU_API_KEY)", kind="authentication_error", code="invalid_api_key"),
                    {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _send_json(send, 413, self._too_big())
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read(receive)
            if body is _GONE:
                return None
            if body is None:
                return await _send_json(send, 413, self._too_big())
            receive = _replay(body, receive)
        return await self._guarded(scope, receive, send)

    async def _read(self, receive):
        """The whole body; ``None`` when it grows over the cap, ``_GONE`` when the client disconnected."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _guarded(self, scope, receive, send):
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - one 500 in the log, and the connection stays usable
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send_json(send, 500, error_body("internal server error (details in the server log)",
                                                       kind="server_error"))

    def _too_big(self) -> dict:
        mb = self.max_body / (1 << 20)
        return error_body(f"request body larger than {mb:g} MB (tpru serve --max-body-mb); send fewer or smaller "
                          "images", code="body_too_large")


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _version() -> str:
    from tpru_agent import __version__

    return __version__


__all__ = ["LimitsMiddleware", "ServerConfig", "create_app", "served_name"]
