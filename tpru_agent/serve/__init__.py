"""``tpru serve``: a TPRU model behind an OpenAI-compatible HTTP API plus task routes (FastAPI + uvicorn).

Routes (JSON in, JSON out; every error is ``{"error": {"message", "type", "param", "code"}}``: 4xx for requests
the server refuses, 5xx for failures on its side, never a traceback). The request and response schemas of every
route are in the README ("Serving").

- ``GET /health``: status, served model name, engine, queue depth, counters (no key needed; no local paths).
- ``GET /v1/models`` and ``GET /v1/models/{id}``: the served name, ``owned_by: "tpru-agent"`` (how clients
  detect the extensions below), ``max_model_len``.
- ``POST /v1/chat/completions``: the OpenAI chat contract: system, user and assistant messages with ``text`` and
  ``image_url`` parts (images as ``data:image/...;base64,`` URLs), ``max_tokens``, ``temperature``, ``top_p``,
  ``seed``, ``stop``, ``stream`` (server-sent events, ``stream_options.include_usage``), ``usage`` and
  ``finish_reason: "length"``. Fields it does not implement (``tools``, ``response_format``,
  ``presence_penalty``, ``logit_bias``, ``n > 1``...) are a 400 naming them. Extensions: ``tpru_score`` (exact
  log-probability of each continuation), ``tpru_question`` (the structured question, for engines that read it)
  and, with the hf engine, vLLM's ``logprobs`` / ``top_logprobs`` / ``prompt_logprobs`` /
  ``continue_final_message`` / ``return_token_ids``.
- ``POST /v1/order``, ``/v1/next``, ``/v1/previous``, ``/v1/verify``: the SDK's task calls; the facade's result
  as ``to_dict()`` JSON.

Cost bounds: the prompt is counted (images included) before it runs and refused over ``--max-model-len``;
``tpru_score`` has count and token limits; ``max_tokens`` is capped; a generation stops at the request's
deadline or when its client disconnects; images are checked from their header (format allow-list, 8 Mpx).
Safety: binds 127.0.0.1 unless told otherwise; ``--api-key`` (or ``TPRU_API_KEY``) requires
``Authorization: Bearer KEY`` on ``/v1/*``; no URL is fetched and no path is read; bodies over ``--max-body-mb``
get 413; one model thread runs every model call from a bounded queue (full: 503 + ``Retry-After``).

Layout: :mod:`.app` (config, factory, middleware) -> :mod:`.routes` -> :mod:`.completions` (chat) ->
:mod:`.chat` (messages, response shapes), :mod:`.bodies` (request models, images), :mod:`.question`,
:mod:`.limits`, :mod:`.tokens`, :mod:`.worker` (the model thread) and :mod:`.errors`; imports flow one way.

Example:
    >>> from tpru_agent import TPRU
    >>> from tpru_agent.serve import ServerConfig, create_app
    >>> app = create_app(TPRU("tpru-3b"), ServerConfig(api_key="secret"))   # doctest: +SKIP
"""

from __future__ import annotations

from tpru_agent.serve.app import ServerConfig, create_app, served_name

__all__ = ["ServerConfig", "create_app", "served_name"]
