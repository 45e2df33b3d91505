"""The routes of ``tpru serve`` (see :mod:`tpru_agent.server` for the API they implement)."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .engines.base import Request
from .server import Mode, finite, run_model
from .server_chat import (
    ChatBody,
    ClientError,
    build_question,
    check_image_count,
    completion,
    count_images,
    decode_image,
    parse_chat,
)
from .server_tokens import TokenAccess

_ImageList = list[str]


class _Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = Field(default=None, max_length=2000)
    mode: Mode = "reason"


class OrderBody(_Task):
    """``POST /v1/order``: frames in any order -> their temporal order."""

    frames: _ImageList = Field(min_length=2)


class NextBody(_Task):
    """``POST /v1/next``: which candidate comes after ``history`` (optionally knowing the final ``goal``)."""

    history: _ImageList = Field(min_length=1)
    candidates: _ImageList = Field(min_length=1)
    goal: str | None = None
    none_position: int | None = -1


class PreviousBody(_Task):
    """``POST /v1/previous``: which candidate comes right before ``later``."""

    later: _ImageList = Field(min_length=1)
    candidates: _ImageList = Field(min_length=1)
    none_position: int | None = -1


class VerifyBody(_Task):
    """``POST /v1/verify``: is ``observation`` a valid next step after ``history``."""

    history: _ImageList = Field(min_length=1)
    observation: str
    goal: str | None = None
    distractors: _ImageList | None = None


async def _decode(values, name: str, *, single: bool = False, budget=None):
    """Decode image references off the event loop (a list, or one reference when ``single``)."""
    if values is None:
        return None
    if single:
        return await asyncio.to_thread(decode_image, values, param=name, budget=budget)
    return await asyncio.to_thread(lambda: [decode_image(v, param=f"{name}[{i}]", budget=budget)
                                            for i, v in enumerate(values)])


def add_routes(app) -> None:
    """Register every route on ``app`` (built by :func:`tpru_agent.server.create_app`)."""
    state = app.state

    def images_ok(*groups) -> None:
        check_image_count(count_images(*groups), state.config.max_images)

    @app.get("/health")
    async def health() -> dict:
        worker = state.worker
        return {"status": "ok", "model": state.served, "engine": state.tpru.engine_name, "queue": worker.depth,
                "uptime_s": round(time.time() - state.started, 3), "stats": dict(worker.stats)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.served, "object": "model", "created": int(state.started),
                                            "owned_by": "tpru-agent", "engine": state.tpru.engine_name}]}

    @app.post("/v1/order")
    async def order(body: OrderBody) -> dict:
        images_ok(body.frames)
        frames = await _decode(body.frames, "frames", budget=state.tpru.budget)
        result = await run_model(app, partial(state.tpru.order_frames, frames, description=body.description,
                                              mode=body.mode))
        return result.to_dict()

    @app.post("/v1/next")
    async def next_frame(body: NextBody) -> dict:
        images_ok(body.history, body.candidates, body.goal)
        history = await _decode(body.history, "history", budget=state.tpru.budget)
        candidates = await _decode(body.candidates, "candidates", budget=state.tpru.budget)
        goal = await _decode(body.goal, "goal", single=True, budget=state.tpru.budget)
        result = await run_model(app, partial(state.tpru.predict_next, history, candidates, goal=goal,
                                              description=body.description, mode=body.mode,
                                              none_position=body.none_position))
        return result.to_dict()

    @app.post("/v1/previous")
    async def previous(body: PreviousBody) -> dict:
        images_ok(body.later, body.candidates)
        later = await _decode(body.later, "later", budget=state.tpru.budget)
        candidates = await _decode(body.candidates, "candidates", budget=state.tpru.budget)
        result = await run_model(app, partial(state.tpru.review_previous, later, candidates,
                                              description=body.description, mode=body.mode,
                                              none_position=body.none_position))
        return result.to_dict()

    @app.post("/v1/verify")
    async def verify(body: VerifyBody) -> dict:
        images_ok(body.history, body.observation, body.goal, body.distractors)
        history = await _decode(body.history, "history", budget=state.tpru.budget)
        observation = await _decode(body.observation, "observation", single=True, budget=state.tpru.budget)
        goal = await _decode(body.goal, "goal", single=True, budget=state.tpru.budget)
        distractors = await _decode(body.distractors, "distractors")
        result = await run_model(app, partial(state.tpru.verify_step, history, observation, goal=goal,
                                              distractors=distractors, description=body.description,
                                              mode=body.mode))
        return result.to_dict()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> dict:
        tpru = state.tpru
        names = {state.served, tpru.model_name, Path(tpru.model_name).name}
        if body.model is not None and body.model not in names:
            raise ClientError(404, f"model {body.model!r} is not served here; this server serves {state.served!r} "
                              "(see GET /v1/models)", param="model", code="model_not_found", kind="not_found_error")
        call = parse_chat(body, tpru.options, max_images=state.config.max_images,
                          max_logprobs=state.config.max_logprobs)
        images = await _decode(call.image_refs, "image_url", budget=tpru.budget)
        request = Request(build_question(body.tpru_question, call.text, len(images)), call.text, tuple(images))
        if body.tpru_score is not None:
            return await _score(app, request, body)
        wants_tokens = (call.prefill is not None or body.logprobs or body.prompt_logprobs is not None
                        or body.return_token_ids)
        if not wants_tokens:
            text = await run_model(app, submit=partial(state.worker.submit_generate, request, call.options))
            return completion(state.served, text)
        tokens = TokenAccess.of(tpru.engine)
        if tokens is None:
            raise ClientError(400, f"logprobs, prompt_logprobs, return_token_ids and continue_final_message need "
                              f"token access, which the served engine ({tpru.engine_name}) does not give; use "
                              "the tpru_score field to score continuations", code="unsupported_by_engine")
        return await run_model(app, partial(_token_call, tokens, tpru.engine, request, call, body, state.served))


async def _score(app, request: Request, body: ChatBody) -> dict:
    score = body.tpru_score
    conts = score.continuations
    if len(set(conts)) != len(conts):
        raise ClientError(400, "tpru_score.continuations must be distinct", param="tpru_score.continuations")
    engine = app.state.tpru.engine
    values = finite(await run_model(app, partial(engine.score, request, conts, prefix=score.prefix)))
    best = max(range(len(conts)), key=values.__getitem__)
    return completion(app.state.served, conts[best], tpru_score={"continuations": conts, "logprobs": values})


def _token_call(tokens: TokenAccess, engine, request: Request, call, body: ChatBody, served: str) -> dict:
    """Runs on the model thread: generation / prefill continuation with token-level log-probs (vLLM shapes)."""
    k = body.top_logprobs or 0
    head, opts = call.prefill or "", call.options
    want_prompt = body.prompt_logprobs is not None
    finish = "stop"
    if call.prefill is not None and opts.max_new_tokens == 1 and opts.temperature == 0:
        # One greedy token after a prefill (how clients read an answer's options): one forward pass.
        trace = tokens.trace(request, head, top_k=max(k, 1), all_positions=want_prompt)
        best, best_lp = trace.next_top[0]
        eos = best in tokens.eos_ids()
        text = "" if eos else tokens.token_text(best)
        finish = "stop" if eos else "length"
        content = [dict(tokens.entry(best, best_lp), top_logprobs=[tokens.entry(i, v) for i, v in
                                                                    trace.next_top[:k]])]
        prompt_end = len(trace.ids)
    else:
        if call.prefill is not None:
            text, cut = tokens.continue_reply(request, head, opts)
            finish = "length" if cut else "stop"
        else:
            text = engine.generate([request], opts)[0]
        trace = tokens.trace(request, head, text, top_k=k, all_positions=want_prompt)
        content = tokens.content_logprobs(trace, k)
        prompt_end = trace.start
    extra: dict[str, Any] = {}
    if want_prompt:
        extra["prompt_logprobs"] = tokens.prompt_logprobs(trace, body.prompt_logprobs)[:prompt_end]
    if body.return_token_ids:
        extra["prompt_token_ids"] = trace.ids[:prompt_end]
    return completion(served, text, finish=finish, logprobs=content if body.logprobs else None, **extra)


__all__ = ["NextBody", "OrderBody", "PreviousBody", "VerifyBody", "add_routes"]
