"""``usage`` in ``tpru serve`` replies for engines other than hf (the hf engine's counts: test_serve_openai.py).

onnx: the openai engine against a served ONNX export counts exactly what a local ONNX engine counts for the same
calls (a generation, a scoring pass, the same scoring pass again from the engine's cache), so an SDK result over
``TPRU(engine="openai")`` reports real prompt tokens. classic: zeros for generation and scoring (it runs no
language model). An engine object (``TPRU(engine=obj)``) counts nothing: ``usage`` is ``null``.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import serve_in_thread, synthetic_frames
from oracle import PixelOracle, frame

from tpru_agent import TPRU
from tpru_agent.engines import create_engine
from tpru_agent.engines.base import GenerationOptions, Request
from tpru_agent.engines.openai import question_payload, user_content
from tpru_agent.tasks import continuation, next_frame, render_prompt

QUESTION = next_frame.build(2, 3, with_goal=False)
NEXT = Request(QUESTION, render_prompt(QUESTION.problem), tuple(synthetic_frames(QUESTION.n_images)))
CONTS = [continuation(a) for a in QUESTION.answers()]
OPTS = GenerationOptions(max_new_tokens=4)
ZERO = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_openai_engine_over_served_onnx_counts_what_onnx_ran(onnx_dir):
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from tpru_agent.serve import ServerConfig, create_app

    local = create_engine("onnx", onnx_dir, device="cpu", threads=1)
    model = TPRU(engine=create_engine("onnx", onnx_dir, device="cpu", threads=1))
    try:
        with serve_in_thread(create_app(model, ServerConfig(served_name="tiny-onnx"))) as url:
            remote = create_engine("openai", None, base_url=url + "/v1", max_retries=0)
            local.take_usage(), remote.take_usage()
            counts = []
            for call in (lambda e: e.score(NEXT, CONTS), lambda e: e.score(NEXT, CONTS),
                         lambda e: e.generate([NEXT], OPTS)):
                call(local), call(remote)  # both engines see the same calls in the same order
                counts.append((local.take_usage(), remote.take_usage()))
            remote.close()
    finally:
        model.close()
        local.close()
    (score_local, score_remote), (again_local, again_remote), (gen_local, gen_remote) = counts
    # A fresh engine runs the whole prompt, its image tokens included, and each continuation's own tokens.
    assert score_remote.prompt_tokens == score_local.prompt_tokens > score_local.image_tokens + len(CONTS)
    assert score_remote.generated_tokens == 0 and score_remote.image_tokens == 0  # the schema has no image split
    # The repeated pass starts from the engine's cache: fewer tokens, still counted (no stale counts carried over).
    assert 0 < again_remote.prompt_tokens == again_local.prompt_tokens < score_local.prompt_tokens
    assert gen_remote.prompt_tokens == gen_local.prompt_tokens > 0
    assert gen_remote.generated_tokens == gen_local.generated_tokens >= 1


def _post(app, bodies: list[dict]) -> list[dict]:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return [await client.post("/v1/chat/completions", json=b) for b in bodies]

    replies = asyncio.run(go())
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    return [r.json() for r in replies]


def _chat(request: Request, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user_content(request)}],
            "tpru_question": question_payload(request.question), **extra}


def test_classic_server_reports_zero_usage():
    from tpru_agent.serve import ServerConfig, create_app

    app = create_app(TPRU("classic"), ServerConfig())
    try:
        generated, scored = _post(app, [_chat(NEXT, max_tokens=8), _chat(NEXT, tpru_score={"continuations": CONTS})])
    finally:
        app.state.worker.close()
    assert generated["choices"][0]["message"]["content"]
    assert generated["usage"] == scored["usage"] == ZERO


def test_engine_object_usage_is_null():
    from tpru_agent.serve import ServerConfig, create_app

    steps = (frame(1), frame(2), frame(3), frame(9), frame(7))
    request = Request(QUESTION, NEXT.text, steps)
    app = create_app(TPRU(engine=PixelOracle()), ServerConfig(served_name="oracle"))
    try:
        generated, scored = _post(app, [_chat(request, max_tokens=8),
                                        _chat(request, tpru_score={"continuations": CONTS})])
    finally:
        app.state.worker.close()
    assert generated["usage"] is None and scored["usage"] is None
    assert scored["tpru_score"]["logprobs"].count(0.0) == 1  # the oracle did answer
