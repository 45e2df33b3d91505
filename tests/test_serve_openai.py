"""``tpru serve`` as the official ``openai`` client sees it, on the tiny checkpoint (hf engine, in process).

Streaming, usage, ``finish_reason: "length"``, stop sequences, system messages and multi-turn, model retrieval,
refusals of unimplemented parameters, the context limit (a 120 KB prompt), scoring limits, and /health staying
responsive while the model thread is busy. Expected texts come from the engine's own ``complete``.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from conftest import serve_in_thread, synthetic_frames

from tpru_agent import TPRU
from tpru_agent.engines.base import GenerationOptions
from tpru_agent.engines.openai import image_data_url
from tpru_agent.serve import ServerConfig, create_app

KEY = "serve-key"
LIMIT = 1024
MAX_NEW = 24


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    model = TPRU(tiny_checkpoint, max_new_tokens=MAX_NEW)
    app = create_app(model, ServerConfig(api_key=KEY, max_model_len=LIMIT, max_score_continuations=8,
                                         max_score_tokens=64))
    with serve_in_thread(app) as url:
        yield url, model, app
    model.close()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


FRAMES = synthetic_frames(2)
PARTS = [{"type": "text", "text": "Order: "}] + [{"type": "image_url", "image_url": {"url": image_data_url(f)}}
                                                 for f in FRAMES]
USER = [{"role": "user", "content": PARTS}]
TURNS = [("user", "Order: <image><image>")]


def test_served_under_the_folder_name_without_paths(server, client):
    base, model, _ = server
    health = httpx.get(base + "/health")
    assert health.json()["model"] == "tiny" and str(model.model_name) not in health.text
    assert "/" not in health.json()["model"]
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.owned_by == "tpru-agent"
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_usage_and_finish_reason(server, client):
    engine = server[1].engine
    prompt = engine.count_tokens(TURNS, FRAMES)
    seen = set()
    for max_tokens in (1, 3, 12):
        resp = client.chat.completions.create(model="tiny", messages=USER, max_tokens=max_tokens)
        want = engine.complete(TURNS, FRAMES, GenerationOptions(max_new_tokens=max_tokens))
        choice, used = resp.choices[0], resp.usage
        assert choice.message.content == want.text
        assert (used.prompt_tokens, used.completion_tokens) == (prompt, want.completion_tokens)
        assert used.total_tokens == used.prompt_tokens + used.completion_tokens
        assert choice.finish_reason == ("length" if used.completion_tokens == max_tokens else "stop")
        seen.add(choice.finish_reason)
    assert "length" in seen  # one token is always cut by max_tokens


def test_stream_equals_the_non_streamed_reply(client):
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # pieces, not one block
    plain_stream = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain_stream)


def test_stop_sequences(server, client):
    engine = server[1].engine
    full = engine.complete(TURNS, FRAMES, GenerationOptions(max_new_tokens=12)).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    want = full[:full.find(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, stop=[stop],
                                                         stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            resp = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, stop=stop)
            text, finish = resp.choices[0].message.content, [resp.choices[0].finish_reason]
        assert text == want and stop not in text and finish == ["stop"]


def test_system_message_and_multi_turn(server, client):
    engine = server[1].engine
    messages = [{"role": "system", "content": "You order frames."}, *USER,
                {"role": "assistant", "content": "BA"}, {"role": "user", "content": "Are you sure?"}]
    turns = [("system", "You order frames."), *TURNS, ("assistant", "BA"), ("user", "Are you sure?")]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    want = engine.complete(turns, FRAMES, GenerationOptions(max_new_tokens=6))
    assert resp.choices[0].message.content == want.text
    assert resp.usage.prompt_tokens == engine.count_tokens(turns, FRAMES) > engine.count_tokens(TURNS, FRAMES)


@pytest.mark.parametrize("extra, named", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"42": 10}}, "logit_bias"),
    ({"n": 2}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_unimplemented_parameters_are_refused(client, extra, named):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, **extra)
    assert named in err.value.message and err.value.code == "unsupported_parameter"


def test_a_120kb_prompt_is_refused_before_it_runs(server, client):
    words = " ".join(f"word{i % 97}" for i in range(20000))  # ~120 KB of text
    assert len(words) > 120_000
    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": words}], max_tokens=1)
    assert time.perf_counter() - started < 10
    assert err.value.code == "context_length_exceeded" and f"limit is {LIMIT} tokens" in err.value.message
    # Short enough in characters to be counted exactly, still over the limit: the exact count is in the message.
    medium = " ".join(f"w{i % 89}" for i in range(1200))
    exact = server[1].engine.count_tokens([("user", medium)], [])
    assert exact > LIMIT
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": medium}], max_tokens=1)
    assert f"has {exact} prompt tokens" in err.value.message
    # A prompt that fits, with max_tokens that does not.
    prompt = server[1].engine.count_tokens(TURNS, FRAMES)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=LIMIT - prompt + 1)
    assert err.value.code in ("context_length_exceeded", "max_tokens_too_large")


def _score(base: str, conts: list[str]) -> httpx.Response:
    body = {"model": "tiny", "messages": USER, "tpru_score": {"continuations": conts}}
    return httpx.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60)


def test_score_limits(server):
    base = server[0]
    ok = _score(base, ["<answer>AB</answer>", "<answer>BA</answer>"])
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 0
    many = _score(base, [f"<answer>{i}</answer>" for i in range(9)])
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_continuations"
    long = _score(base, ["x " * 100, "y " * 100])
    assert long.status_code == 400 and long.json()["error"]["code"] == "score_too_large"
    huge = _score(base, ["z" * 200_000, "q"])
    assert huge.status_code == 400 and "at least" in huge.json()["error"]["message"]


def test_health_answers_while_the_model_thread_is_busy(server, client):
    base, _, app = server
    gate = threading.Event()
    app.state.worker.submit(gate.wait)  # the model thread is held
    try:
        pending = threading.Thread(target=lambda: client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=2))
        pending.start()
        started = time.perf_counter()
        assert httpx.get(base + "/health", timeout=5).json()["queue"] >= 1
        assert time.perf_counter() - started < 2
    finally:
        gate.set()
    pending.join(60)


def test_generation_stops_at_the_deadline_or_when_cancelled(server):
    engine = server[1].engine
    opts = GenerationOptions(max_new_tokens=MAX_NEW)
    late = engine.complete(TURNS, FRAMES, opts, deadline=time.monotonic() - 1)
    cancelled = engine.complete(TURNS, FRAMES, opts, should_stop=lambda: True)
    for done in (late, cancelled):
        assert done.completion_tokens == 1 and done.finish_reason == "length"
