"""``tpru serve`` request handling without a model: malformed questions, hostile images, refusals, paths.

A classic-engine server (no weights) runs in process through httpx's ASGI transport, so every check here is a
real HTTP exchange against the real app; the connection-level checks (keep-alive after a refused image) use a
real uvicorn server on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import httpx
import pytest
from conftest import serve_in_thread
from oracle import frame

from tpru_agent import TPRU
from tpru_agent.engines.openai import image_data_url, question_payload
from tpru_agent.serve import ServerConfig, create_app, served_name
from tpru_agent.serve.bodies import ChatBody
from tpru_agent.serve.chat import parse_chat, refuse_unsupported
from tpru_agent.serve.errors import ClientError
from tpru_agent.serve.question import build_question
from tpru_agent.tasks import next_frame, ordering, previous


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A PNG whose header claims width x height pixels (118 bytes: the pixels are never there)."""
    def part(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + part(b"IHDR", ihdr) + part(b"IDAT", zlib.compress(b"\0" * 64)) + part(b"IEND", b"")


BOMB = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
URL = [image_data_url(frame(s)) for s in range(1, 6)]


@pytest.fixture(scope="module")
def classic_app():
    app = create_app(TPRU("classic"), ServerConfig())
    yield app
    app.state.worker.close()


def post_all(app, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return [await client.post(path, json=b) for b in bodies]

    return asyncio.run(go())


def _chat(question: dict | None, n_images: int, text: str = "Q: ") -> dict:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in URL[:n_images]]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 8}
    if question is not None:
        body["tpru_question"] = question
    return body


GOOD = {"ordering": question_payload(ordering.build(3)),
        "mcq": question_payload(ordering.build_mcq(3, ["ABC", "CBA"], none_position=0)),
        "next": question_payload(next_frame.build(2, 2, with_goal=True)),
        "previous": question_payload(previous.build(2, 2))}


def _with(name: str, **change) -> dict:
    return {**GOOD[name], **change}


# Each: (the tpru_question, images sent). Every one was a 500 or must stay a 4xx.
MALFORMED = [
    (None, 2), (None, 0), ({}, 2), ({"task": "ordering"}, 2), ("ordering", 2), ([1, 2], 2),
    (_with("ordering", n_images=2), 3), (_with("ordering", n_images="3"), 3), (_with("ordering", n_images=True), 3),
    (_with("ordering", labels=["A", "B"]), 3), (_with("ordering", labels=["A", "A", "B"]), 3),
    (_with("ordering", labels=list("ABCDEFGHIJ"), n_images=10), 5), (_with("ordering", labels=None), 3),
    (_with("ordering", options=[["A", 0]]), 3), (_with("ordering", task="sorting"), 3),
    (_with("ordering", task=None), 3), (_with("ordering", colour="red"), 3), (_with("ordering"), 0),
    (_with("ordering", labels=["A", "B", "C", "D", "E"], n_images=5), 5), (_with("mcq", options=[]), 3),
    (_with("mcq", options=[["A", "ABD"], ["B", "CBA"]]), 3), (_with("mcq", options=[["A", None], ["B", None]]), 3),
    (_with("mcq", options=[["A", 1.5]]), 3), (_with("mcq", options=[["Z", "ABC"]]), 3),
    (_with("mcq", options=[["A", "ABC", 3]]), 3), (_with("mcq", options=[["A"]]), 3), (_with("mcq", options="AB"), 3),
    (_with("next", context_steps=[]), 5), (_with("next", target_step=None), 5), (_with("next", target_step=2), 5),
    (_with("next", context_steps=[1, 1, 4]), 5), (_with("next", options=[["A", 0], ["B", 5], ["C", None]]), 5),
    (_with("next", options=[["A", 0], ["A", 1], ["C", None]]), 5), (_with("next", options=[["A", -1]]), 4),
    (_with("next", options=[["A", None], ["B", None]]), 3), (_with("next", options=[["A", "0"], ["B", 1]]), 5),
    (_with("next", context_steps=["1", 2, 4]), 5), (_with("next", n_images=4), 4), (_with("previous", options=[]), 2),
    (_with("previous", context_steps=[3, 4], target_step=3), 4), (_with("previous", context_steps=[2.5, 3]), 4),
    (_with("previous", target_step="x"), 4),
]


def test_malformed_questions_are_4xx_on_a_classic_server(classic_app):
    """42 malformed tpru_question / text-only requests: each a 4xx with a message, never a 500."""
    assert len(MALFORMED) == 42
    replies = post_all(classic_app, "/v1/chat/completions", [_chat(q, n) for q, n in MALFORMED])
    for (q, n), resp in zip(MALFORMED, replies):
        assert 400 <= resp.status_code < 500, (q, n, resp.status_code, resp.text)
        assert resp.json()["error"]["message"], (q, n)


def test_well_formed_questions_answer_on_a_classic_server(classic_app):
    n_images = {"ordering": 3, "mcq": 3, "next": 5, "previous": 4}
    bodies = [_chat(GOOD[name], n_images[name]) for name in GOOD]
    for body, resp in zip(bodies, post_all(classic_app, "/v1/chat/completions", bodies)):
        assert resp.status_code == 200, resp.text
        assert "<answer>" in resp.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("question", [ordering.build(2), ordering.build(4),
                                      ordering.build_mcq(4, ["ABCD", "DCBA"], none_position=1),
                                      next_frame.build(2, 3, with_goal=True),
                                      next_frame.build(1, 1, none_position=None),
                                      previous.build(3, 2, none_position=0)], ids=lambda q: q.task)
def test_question_payload_round_trips(question):
    assert build_question(question_payload(question), question.problem, question.n_images) == question


@pytest.mark.parametrize("extra, named", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"42": 10}}, "logit_bias"),
    ({"n": 2}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tools": [{"type": "function"}], "frequency_penalty": 1.0}, "frequency_penalty, tools"),
])
def test_unimplemented_fields_are_refused_by_name(extra, named):
    body = ChatBody(messages=[{"role": "user", "content": "hi"}], **extra)
    with pytest.raises(ClientError) as err:
        refuse_unsupported(body)
    assert err.value.status == 400 and named in err.value.message and err.value.code == "unsupported_parameter"
    # the hints speak only of what the request set
    assert ("n must be 1" in err.value.message) == ("n" in extra)
    assert ("needs logprobs" in err.value.message) == ("top_logprobs" in extra)


@pytest.mark.parametrize("extra", [{"presence_penalty": 0}, {"n": 1}, {"response_format": {"type": "text"}},
                                   {"tools": []}, {"logprobs": True, "top_logprobs": 2}, {"user": "u1"}])
def test_default_values_of_unimplemented_fields_pass(extra):
    refuse_unsupported(ChatBody(messages=[{"role": "user", "content": "hi"}], **extra))


@pytest.mark.parametrize("messages, turns", [
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], (("system", "S"), ("user", "U"))),
    ([{"role": "developer", "content": "S"}, {"role": "system", "content": [{"type": "text", "text": "T"}]},
      {"role": "user", "content": "U"}], (("system", "S\nT"), ("user", "U"))),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     (("user", "a"), ("assistant", "b"), ("user", "c"))),
])
def test_system_and_multi_turn_messages(messages, turns):
    from tpru_agent.engines.base import GenerationOptions

    assert parse_chat(ChatBody(messages=messages), GenerationOptions(), max_images=4).turns == turns


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "tool", "content": "a"}], [{"role": "assistant", "content": [{"type": "image_url"}]},
                                         {"role": "user", "content": "a"}],
    [{"role": "user", "content": 3}], [{"content": "no role"}],
])
def test_message_layouts_refused(messages):
    from tpru_agent.engines.base import GenerationOptions

    with pytest.raises(ClientError) as err:
        parse_chat(ChatBody(messages=messages), GenerationOptions(), max_images=4)
    assert err.value.status == 400


def test_bomb_header_is_413_on_a_task_route(classic_app):
    resp = post_all(classic_app, "/v1/order", [{"frames": [URL[0], BOMB], "mode": "fast"}])[0]
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "image_too_large", resp.text


def test_served_name_hides_local_paths(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert served_name(str(folder)) == "my-model"
    assert served_name("Stephengzk/TPRU-3B") == "Stephengzk/TPRU-3B"
    assert served_name("tpru-3b") == "tpru-3b"


@pytest.fixture(scope="module")
def classic_server():
    pytest.importorskip("uvicorn")
    with serve_in_thread(create_app(TPRU("classic"), ServerConfig())) as url:
        yield url


def test_bomb_keeps_the_keep_alive_connection_healthy(classic_server):
    """The refused image is a 413, and the next request on the same connection is answered (not reset)."""
    good = {"frames": URL[:3], "mode": "fast"}
    with httpx.Client(base_url=classic_server, timeout=60) as client:
        for _ in range(2):
            bad = client.post("/v1/order", json={"frames": [URL[0], BOMB], "mode": "fast"})
            assert bad.status_code == 413 and "Traceback" not in bad.text
            ok = client.post("/v1/order", json=good)
            assert ok.status_code == 200, ok.text
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["model"] == "classic"


def test_a_crash_is_one_500_and_the_connection_survives(classic_server, monkeypatch):
    """An unexpected engine failure (a bug, not bad input) is a 500 JSON error; the connection keeps working."""
    from tpru_agent.engines.classic import ClassicEngine

    def broken(self, request):
        raise IndexError("a bug")

    monkeypatch.setattr(ClassicEngine, "answer_scores", broken)
    with httpx.Client(base_url=classic_server, timeout=60) as client:
        resp = client.post("/v1/order", json={"frames": URL[:3], "mode": "fast"})
        assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
        assert "a bug" not in resp.text and "Traceback" not in resp.text
        assert client.get("/health").status_code == 200


def test_server_load_is_part_of_the_benchmark_suite():
    from benchmarks.__main__ import discover

    assert discover()["server_load"]["runnable"]


def test_png_bytes_helper_is_what_it_claims():
    from PIL import Image

    data = bomb_png()
    assert len(data) < 200
    with Image.open(io.BytesIO(bomb_png(4, 3))) as img:
        assert img.size == (4, 3)
