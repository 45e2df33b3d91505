"""The routes of ``tpru serve`` (the API is described in :mod:`tpru_agent.serve`)."""

from __future__ import annotations

import asyncio
import time
from functools import partial

from tpru_agent.serve.bodies import (
    ChatBody,
    NextBody,
    OrderBody,
    PreviousBody,
    VerifyBody,
    check_image_count,
    count_images,
    decode_image,
)
from tpru_agent.serve.completions import chat_completions
from tpru_agent.serve.errors import ClientError
from tpru_agent.serve.worker import run_model


async def _decode(values, name: str, *, single: bool = False, budget=None):
    """Decode image references off the event loop (a list, or one reference when ``single``)."""
    if values is None:
        return None
    if single:
        return await asyncio.to_thread(decode_image, values, param=name, budget=budget)
    return await asyncio.to_thread(lambda: [decode_image(v, param=f"{name}[{i}]", budget=budget)
                                            for i, v in enumerate(values)])


def add_routes(app) -> None:
    """Register every route on ``app`` (built by :func:`tpru_agent.serve.create_app`)."""
    state = app.state
    _add_info_routes(app, state)
    _add_task_routes(app, state)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        return await chat_completions(state, body)


def _model_card(state) -> dict:
    return {"id": state.served, "object": "model", "created": int(state.started), "owned_by": "tpru-agent",
            "engine": state.tpru.engine_name, "max_model_len": state.context_limit}


def _add_info_routes(app, state) -> None:
    @app.get("/health")
    async def health() -> dict:  # no key needed: nothing here names a local path
        worker = state.worker
        return {"status": "ok", "model": state.served, "engine": state.tpru.engine_name, "queue": worker.depth,
                "uptime_s": round(time.time() - state.started, 3), "stats": dict(worker.stats)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id not in state.names:
            raise ClientError(404, f"model {model_id!r} is not served here; this server serves {state.served!r}",
                              param="model", code="model_not_found", kind="not_found_error")
        return _model_card(state)


def _add_task_routes(app, state) -> None:
    def images_ok(*groups) -> None:
        check_image_count(count_images(*groups), state.config.max_images)

    def budget():
        return state.tpru.budget

    @app.post("/v1/order")
    async def order(body: OrderBody) -> dict:
        images_ok(body.frames)
        frames = await _decode(body.frames, "frames", budget=budget())
        result = await run_model(state, partial(state.tpru.order_frames, frames, description=body.description,
                                                mode=body.mode))
        return _public(result.to_dict(), state.served)

    @app.post("/v1/next")
    async def next_frame(body: NextBody) -> dict:
        images_ok(body.history, body.candidates, body.goal)
        history = await _decode(body.history, "history", budget=budget())
        candidates = await _decode(body.candidates, "candidates", budget=budget())
        goal = await _decode(body.goal, "goal", single=True, budget=budget())
        result = await run_model(state, partial(state.tpru.predict_next, history, candidates, goal=goal,
                                                description=body.description, mode=body.mode,
                                                none_position=body.none_position))
        return _public(result.to_dict(), state.served)

    @app.post("/v1/previous")
    async def previous(body: PreviousBody) -> dict:
        images_ok(body.later, body.candidates)
        later = await _decode(body.later, "later", budget=budget())
        candidates = await _decode(body.candidates, "candidates", budget=budget())
        result = await run_model(state, partial(state.tpru.review_previous, later, candidates,
                                                description=body.description, mode=body.mode,
                                                none_position=body.none_position))
        return _public(result.to_dict(), state.served)

    @app.post("/v1/verify")
    async def verify(body: VerifyBody) -> dict:
        images_ok(body.history, body.observation, body.goal, body.distractors)
        history = await _decode(body.history, "history", budget=budget())
        observation = await _decode(body.observation, "observation", single=True, budget=budget())
        goal = await _decode(body.goal, "goal", single=True, budget=budget())
        distractors = await _decode(body.distractors, "distractors", budget=budget())
        result = await run_model(state, partial(state.tpru.verify_step, history, observation, goal=goal,
                                                distractors=distractors, description=body.description,
                                                mode=body.mode))
        return _public(result.to_dict(), state.served)


def _public(reply: dict, served: str) -> dict:
    """``reply`` with every ``settings["model"]`` (the result's own and its nested choice's) naming the model by its
    served name: a local path never leaves the server."""
    for value in reply.values():
        if isinstance(value, dict):
            _public(value, served)
    settings = reply.get("settings")
    if isinstance(settings, dict) and "model" in settings:
        settings["model"] = served
    return reply


__all__ = ["add_routes"]
