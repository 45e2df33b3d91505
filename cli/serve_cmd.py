"""``tpru serve``: the model behind an OpenAI-compatible HTTP API plus task routes (see tpru_agent.serve).

Imports only click and the CLI's printer at module level; the model and the web stack load inside the command.
"""

from __future__ import annotations

import ipaddress

import click

from tpru_agent.cli import render

LOOPBACK = "127.0.0.1"


def check_port(host: str, port: int) -> None:
    """Fail now, before the model loads and before "serving ..." is printed, when ``host:port`` cannot be bound.

    Raises:
        ConfigError: the address is in use, not local, or not permitted.
    """
    import socket

    from tpru_agent.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} does not resolve ({exc})") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or stop "
                              "what is using it") from exc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@click.option("--model", "-m", default="tpru-3b", show_default=True,
              help="Name (tpru-3b...), Hub id, local folder, ONNX export folder, or 'classic'.")
@click.option("--engine", "-e", default="auto", show_default=True,
              type=click.Choice(["auto", "hf", "onnx", "classic", "openai"]),
              help="Runtime behind the server (openai: relay to another server given by --base-url).")
@click.option("--quantization", "-q", default=None, type=click.Choice(["4bit", "8bit"]), help="hf engine only.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda > mps > cpu), cuda, cpu ...")
@click.option("--template", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Jinja preamble file for the task routes (uses {{ content }}).")
@click.option("--base-url", default=None, help="--engine openai: the upstream server URL.")
@click.option("--host", default=LOOPBACK, show_default=True,
              help="Interface to bind. Anything but loopback exposes the model to the network: set --api-key.")
@click.option("--port", "-p", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="TPRU_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (also from TPRU_API_KEY).")
@click.option("--served-model-name", default=None,
              help="Model name clients send (default: the model folder's name, or the alias / Hub id given).")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(0.01, 4096),
              help="Largest request body in MB (HTTP 413 above it).")
@click.option("--max-images", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Most images in one request.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(1, 100000),
              help="Most model jobs waiting (HTTP 503 above it).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Most chat generations batched into one engine call.")
@click.option("--max-new-tokens", default=1024, show_default=True, type=click.IntRange(1, 32768),
              help="Reasoning budget of the task routes, and the default max_tokens of chat completions.")
@click.option("--max-logprobs", default=20, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Largest top_logprobs / prompt_logprobs a request may ask for (as vLLM's flag).")
@click.option("--max-model-len", default=None, type=click.IntRange(16, 10_000_000),
              help="Context limit in tokens (prompt + images + reply), counted before a request runs; longer "
                   "requests get a 400 (default: the model's own maximum).")
@click.option("--max-score-continuations", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="Most tpru_score continuations in one request.")
@click.option("--max-score-tokens", default=8192, show_default=True, type=click.IntRange(1, 10_000_000),
              help="Most tokens of all tpru_score continuations of one request together.")
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, type=click.FloatRange(1, 86400),
              help="Seconds a request may take (HTTP 504 after; a running generation stops).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(model, engine, quantization, device, template, base_url, host, port, api_key, served_model_name,
          max_body_mb, max_images, max_queue, max_batch, max_new_tokens, max_logprobs, max_model_len,
          max_score_continuations, max_score_tokens, timeout_s, log_level):
    """Serve a TPRU model over HTTP: OpenAI-compatible /v1/chat/completions and /v1/order, /v1/next,
    /v1/previous, /v1/verify (images as data URLs). Drive it from Python with
    TPRU("NAME", engine="openai", base_url="http://127.0.0.1:8000/v1")."""
    from tpru_agent.errors import require

    require("fastapi", "serve", what="tpru serve")
    uvicorn = require("uvicorn", "serve", what="tpru serve")
    from tpru_agent import TPRU
    from tpru_agent.serve import ServerConfig, create_app, served_name

    if engine == "openai":
        from tpru_agent.errors import ConfigError

        if not base_url:
            raise ConfigError("--engine openai relays to another server: pass its --base-url (the default would be "
                              "this server's own address)")
        if f":{port}" in base_url and any(h in base_url for h in ("127.0.0.1", "localhost", host)):
            raise ConfigError(f"--base-url {base_url} points at this server itself (port {port}); it would wait on "
                              "its own queue forever")
    if not _is_loopback(host) and not api_key:
        render.warn(f"binding {host} without --api-key: anyone who can reach this port can use the model")
    config = ServerConfig(host=host, port=port, api_key=api_key, served_name=served_model_name,
                          max_body_bytes=int(max_body_mb * (1 << 20)), max_images=max_images, max_queue=max_queue,
                          max_batch=max_batch, request_timeout_s=timeout_s, max_logprobs=max_logprobs,
                          max_model_len=max_model_len, max_score_continuations=max_score_continuations,
                          max_score_tokens=max_score_tokens)
    kwargs = {"base_url": base_url} if base_url else {}
    check_port(host, port)
    render.note(f"loading {model} (engine {engine}) ...")
    tpru = TPRU(model, engine=engine, quantization=quantization, device=device, template=template,
                max_new_tokens=max_new_tokens, **kwargs)
    app = create_app(tpru, config)
    name = served_model_name or served_name(model)
    render.note(f"serving {name!r} ({tpru.engine_name} engine, loaded in {tpru.load_s:.1f} s) on "
                f"http://{host}:{port}/v1{'  (API key required)' if api_key else ''}")
    try:
        # A connection cap bounds the request bodies held in memory before the queue limit applies.
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                    timeout_graceful_shutdown=5, limit_concurrency=max_queue + 2 * max_batch)
    finally:
        tpru.close()
