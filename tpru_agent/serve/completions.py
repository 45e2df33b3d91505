"""``POST /v1/chat/completions``: generation (streamed or not), ``tpru_score``, and vLLM's token-level fields.

With the hf engine every reply comes from :meth:`HFTokens.complete <tpru_agent.engines.hf_tokens.HFTokens.complete>`
on the model thread: the prompt is counted against the context limit first, then decoded with stop sequences,
the request's deadline and a cancel flag (a client that disconnects stops its generation), and the reply carries
``usage`` (the tokenizer's count of the whole prompt, images included, and the new tokens) and ``finish_reason``.
Other engines answer a single user turn through ``engine.generate`` (micro-batched) and stop sequences cut the
finished text; their ``usage`` is the engine's own count (:meth:`~tpru_agent.engines.base.Engine.take_usage`) of
the tokens it ran for the request: onnx the prompt from where its cache left off and the new tokens, openai what
its upstream server reported, classic zeros (it runs no language model: zero tokens, not an unknown count). It is
``null`` when the request shared its ``generate`` call with others (a batch's count cannot be split among its
requests) and for an engine object passed as ``TPRU(engine=obj)`` (it counts nothing).

A ``tpru_score`` reply's ``usage`` has ``completion_tokens: 0`` (scoring decodes nothing); ``prompt_tokens`` is the
hf tokenizer's count of the prompt (prefix included), or for other engines their own count of what ``score`` ran
(the prompt from where a cache left off, plus each continuation's tokens; 0 for classic).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import replace
from functools import partial
from typing import Any, AsyncIterator, Callable

from tpru_agent.engines.base import CustomEngine, Request, Usage
from tpru_agent.engines.hf_tokens import HFTokens
from tpru_agent.serve.bodies import ChatBody, decode_image
from tpru_agent.serve.chat import ChatCall, chunk, completion, new_id, parse_chat, usage
from tpru_agent.serve.errors import ClientError
from tpru_agent.serve.limits import check_score, context_limit, count_prompt, fit_context
from tpru_agent.serve.question import build_question
from tpru_agent.serve.tokens import content_logprobs, entry, prompt_logprobs
from tpru_agent.serve.worker import model_error, run_model

log = logging.getLogger(__name__)


def finite(values: list[float]) -> list[float]:
    """JSON has no infinities: a ``-inf`` log-prob (probability 0) is sent as -1e30; NaN is an engine error."""
    from tpru_agent.errors import TPRUError

    out = []
    for v in map(float, values):
        if v != v:
            raise TPRUError("the engine returned NaN log-probs (numerical overflow; try dtype='fp32')")
        out.append(min(max(v, -1e30), 1e30))
    return out


async def chat_completions(state, body: ChatBody):
    """The route body: returns a JSON dict, or a streaming response for ``stream: true``."""
    tpru = state.tpru
    if body.model is not None and body.model not in state.names:
        raise ClientError(404, f"model {body.model!r} is not served here; this server serves {state.served!r} "
                          "(see GET /v1/models)", param="model", code="model_not_found", kind="not_found_error")
    call = parse_chat(body, tpru.options, max_images=state.config.max_images, max_logprobs=state.config.max_logprobs)
    engine = tpru.engine
    hf = isinstance(engine, HFTokens)
    _refuse_for_engine(body, call, engine, hf)
    images = await asyncio.to_thread(lambda: [decode_image(r, param=f"image_url[{i}]", budget=tpru.budget)
                                              for i, r in enumerate(call.image_refs)])
    question = build_question(body.tpru_question, call.text, len(images))
    if body.tpru_score is not None:
        return await _score(state, call, Request(question, call.text, tuple(images)), body)
    requested = body.max_completion_tokens or body.max_tokens
    if not hf:
        return await _generic(state, call, Request(question, call.text, tuple(images)), body, requested)
    job = partial(_hf_job, engine, call, images, body, state, requested)
    if body.stream:
        return await _stream(state, job, body)
    cancel = threading.Event()
    out = await run_model(state, partial(job, should_stop=cancel.is_set), cancel=cancel)
    return completion(state.served, out.pop("text"), **out)


def _refuse_for_engine(body: ChatBody, call: ChatCall, engine, hf: bool) -> None:
    wants_tokens = bool(body.logprobs) or body.prompt_logprobs is not None or body.return_token_ids
    if body.stream and (wants_tokens or body.tpru_score is not None):
        raise ClientError(400, "stream: true cannot be combined with logprobs, prompt_logprobs, return_token_ids "
                          "or tpru_score; send stream: false", param="stream")
    if body.tpru_score is not None and (not call.single_turn or call.prefill is not None):
        raise ClientError(400, "tpru_score scores continuations of one user turn: send one user message (no "
                          "system message, no continue_final_message; put reasoning in tpru_score.prefix)",
                          param="tpru_score")
    if hf:
        return
    name = engine.name
    if wants_tokens or call.prefill is not None:
        raise ClientError(400, f"logprobs, prompt_logprobs, return_token_ids and continue_final_message need token "
                          f"access, which the served engine ({name}) does not give; use the tpru_score field to "
                          "score continuations", code="unsupported_by_engine")
    if not call.single_turn:
        raise ClientError(400, f"the served engine ({name}) answers one user message; system messages and earlier "
                          "turns need the hf engine", param="messages", code="unsupported_by_engine")
    if name == "classic" and body.tpru_question is None:
        raise ClientError(400, "the classic engine reads no text: send the structured question as tpru_question "
                          "(TPRU(engine='openai') does)", param="tpru_question", code="unsupported_by_engine")


# ---------------------------------------------------------------------------------------------- hf engine
def _hf_job(engine: HFTokens, call: ChatCall, images: list, body: ChatBody, state, requested: int | None, *,
            on_start: Callable[[int], None] | None = None, on_text: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:
    """Runs on the model thread: count, then generate / continue / trace. Returns completion() keyword args."""
    started = time.monotonic()
    limit = context_limit(engine, state.limits)
    prefill = call.prefill or ""
    prompt = count_prompt(engine, call.turns, images, reply=prefill, limit=limit)
    budget = fit_context(prompt, requested=requested, default_new=state.tpru.options.max_new_tokens, limit=limit)
    opts = replace(call.options, max_new_tokens=budget)
    if on_start is not None:
        on_start(prompt)
    k, want_prompt = body.top_logprobs or 0, body.prompt_logprobs is not None
    wants_tokens = bool(body.logprobs) or want_prompt or body.return_token_ids
    extra: dict[str, Any] = {}
    if wants_tokens and call.prefill is not None and opts.max_new_tokens == 1 and opts.temperature == 0:
        # One greedy token after a prefill (how clients read an answer's options): one forward pass.
        trace = engine.trace(call.turns, images, prefill, top_k=max(k, 1), all_positions=want_prompt)
        best, best_lp = trace.next_top[0]
        eos = best in engine.eos_ids()
        text, finish, n_new = ("" if eos else engine.token_text(best)), ("stop" if eos else "length"), 1
        content = [dict(entry(engine, best, best_lp), top_logprobs=[entry(engine, i, v) for i, v in
                                                                   trace.next_top[:k]])]
        prompt_end = len(trace.ids)
    else:
        deadline = started + state.config.request_timeout_s
        done = engine.complete(call.turns, images, opts, prefill=prefill, stop=call.stop, on_text=on_text,
                               should_stop=should_stop, deadline=deadline)
        text, finish, n_new = done.text, done.finish_reason, done.completion_tokens
        if wants_tokens:
            trace = engine.trace(call.turns, images, prefill, text, top_k=k, all_positions=want_prompt)
            content, prompt_end = content_logprobs(engine, trace, k), trace.start
    if want_prompt:
        extra["prompt_logprobs"] = prompt_logprobs(engine, trace, body.prompt_logprobs)[:prompt_end]
    if body.return_token_ids:
        extra["prompt_token_ids"] = trace.ids[:prompt_end]
    return dict(text=text, finish=finish, logprobs=content if body.logprobs else None, tokens=usage(prompt, n_new),
                **extra)


async def _stream(state, job: Callable[..., dict], body: ChatBody):
    """Server-sent events: the first chunk as soon as the prompt is counted, text as it is decoded."""
    from starlette.responses import StreamingResponse

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def push(kind: str, value: Any = None) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    fut = await _submit(state, partial(job, on_start=partial(push, "start"), on_text=partial(push, "text"),
                                       should_stop=cancel.is_set))
    fut.add_done_callback(lambda f: push("done", f))
    try:
        kind, value = await asyncio.wait_for(events.get(), state.config.request_timeout_s)
    except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
        fut.cancel()
        cancel.set()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise ClientError(504, f"the model did not start within {state.config.request_timeout_s:g} s (tpru serve "
                          "--timeout)", kind="timeout", code="timeout") from exc
    if kind == "done":  # refused or failed before the first token: a plain JSON error
        raise model_error(value.exception(), state.scrub) if value.exception() else ClientError(
            500, "the generation ended before it started", kind="server_error")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_events(state, events, fut, cancel, value, include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _events(state, events: asyncio.Queue, fut, cancel: threading.Event, prompt: int,
                  include_usage: bool) -> AsyncIterator[str]:
    cid, served = new_id(), state.served
    try:
        yield _sse(chunk(cid, served, delta={"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield _sse(chunk(cid, served, delta={"content": value}))
                continue
            if kind != "done":
                continue
            exc = value.exception() if not value.cancelled() else None
            if exc is not None or value.cancelled():
                err = model_error(exc, state.scrub) if exc is not None else ClientError(499, "cancelled")
                if not isinstance(err, ClientError):
                    log.error("unhandled error in a streamed generation", exc_info=err)
                    err = ClientError(500, "internal server error (details in the server log)", kind="server_error")
                yield _sse(err.body())
            else:
                result = value.result()
                yield _sse(chunk(cid, served, finish=result["finish"]))
                if include_usage:
                    yield _sse(chunk(cid, served, tokens=result["tokens"]))
            yield "data: [DONE]\n\n"
            return
    finally:  # the client went away (or we finished): stop the generation it asked for
        cancel.set()
        fut.cancel()


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _submit(state, call):
    try:
        return state.worker.submit(call)
    except Exception as exc:  # noqa: BLE001 - QueueFullError / WorkerClosedError -> 503
        from tpru_agent.serve.worker import QueueFullError

        if isinstance(exc, QueueFullError):
            raise ClientError(503, str(exc), kind="server_busy", code="queue_full",
                              headers={"Retry-After": "1"}) from exc
        raise model_error(exc) from exc


# ---------------------------------------------------------------------------------------------- other engines
async def _generic(state, call: ChatCall, request: Request, body: ChatBody, requested: int | None):
    """A non-token engine: bound the prompt in bytes, generate (micro-batched), cut at stop sequences."""
    limit = context_limit(state.tpru.engine, state.limits)
    size = count_prompt(state.tpru.engine, call.turns, request.images, reply="", limit=limit)
    fit_context(size, requested=requested, default_new=0, limit=limit)
    done = await run_model(state, submit=partial(state.worker.submit_generate, request, call.options))
    text, tokens = done.text, _counted(state.tpru.engine, done.usage)
    cut = min((i for i in (text.find(s) for s in call.stop) if i >= 0), default=-1)
    text, finish = (text[:cut], "stop") if cut >= 0 else (text, "stop")
    if not body.stream:
        return completion(state.served, text, finish=finish, tokens=tokens)
    from starlette.responses import StreamingResponse

    cid = new_id()
    parts = [chunk(cid, state.served, delta={"role": "assistant", "content": ""}),
             chunk(cid, state.served, delta={"content": text}), chunk(cid, state.served, finish=finish)]
    if body.stream_options and body.stream_options.include_usage:
        parts.append({**chunk(cid, state.served, tokens={}), "usage": tokens})  # tokens None: not counted

    async def gen():
        for part in parts:
            yield _sse(part)
        yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


async def _score(state, call: ChatCall, request: Request, body: ChatBody) -> dict:
    """``tpru_score``: the limits are checked on the model thread, then the engine's own ``score``."""
    conts, prefix = body.tpru_score.continuations, body.tpru_score.prefix
    engine, limits = state.tpru.engine, state.limits

    def job():
        limit = context_limit(engine, limits)
        prompt = count_prompt(engine, call.turns, request.images, reply=prefix, limit=limit)
        check_score(engine, conts, prompt, limits, limit)
        values, used = engine.counting(lambda: engine.score(request, conts, prefix=prefix))
        return prompt, values, used

    if len(conts) > limits.max_score_continuations:  # refuse before queueing when no count is needed
        check_score(engine, conts, 0, limits, 1 << 30)
    prompt, values, used = await run_model(state, job)
    values = finite(values)
    best = max(range(len(conts)), key=values.__getitem__)
    tokens = usage(prompt, 0) if isinstance(engine, HFTokens) else _counted(engine, replace(used, generated_tokens=0))
    return completion(state.served, conts[best], tokens=tokens,
                      tpru_score={"continuations": conts, "logprobs": values})


def _counted(engine, used: Usage | None) -> dict | None:
    """OpenAI ``usage`` from an engine's count; ``None`` when uncounted (a shared batch, an engine object's)."""
    if used is None or isinstance(engine, CustomEngine):
        return None
    return usage(used.prompt_tokens, used.generated_tokens)


__all__ = ["chat_completions", "finite"]
