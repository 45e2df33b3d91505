"""``tpru serve`` pieces that need no server subprocess: the openai engine's pure helpers, the model worker's
batching and queue, reason mode end to end against an in-process server with a pixel-reading engine (the structured
question and the reasoning prefix travel), a full queue's 503 and the CLI's checks. The served subprocess is
test_server.py.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import serve_in_thread, synthetic_frames
from oracle import PixelOracle, frame

from tpru_agent import TPRU, ConfigError, EngineUnavailableError
from tpru_agent.engines.base import Engine, GenerationOptions, Request
from tpru_agent.engines.openai import (
    OpenAIEngine,
    continuation_logprob,
    image_data_url,
    match_top_logprobs,
    normalize_base_url,
    pretoken_split,
)
from tpru_agent.serve.bodies import image_bytes
from tpru_agent.serve.errors import ClientError
from tpru_agent.serve.worker import ModelWorker, QueueFullError, WorkerClosedError
from tpru_agent.tasks import ordering, render_prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.server_load import free_port  # noqa: E402

URL = image_data_url(frame(1))


# ---------------------------------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize("remainders, top, want", [
    ([">A</answer>", ">B</answer>"], [(">B", -0.1), (">", -3.0), (">A", -2.5)], [-2.5, -0.1]),
    ([">A</answer>", ">B</answer>", ">C</answer>"], [(">A", -1.0), ("x", -0.5)], [-1.0, None, None]),
    ([">AB</answer>", ">AC</answer>"], [(">A", -0.2)], [None, None]),  # shared token: says nothing
    ([">A</answer>", ">B</answer>"], [(">A", -1.0), (">A<", -1.0)], [-1.0 + 0.6931471805599453, None]),
])
def test_match_top_logprobs(remainders, top, want):
    got = match_top_logprobs(remainders, top)
    assert [None if g is None else round(g, 9) for g in got] == [None if w is None else round(w, 9) for w in want]


@pytest.mark.parametrize("text, at, want", [
    ("<answer>A</answer>", 8, 7),            # '>A' is one pre-token: the prefill must end at '<answer'
    ("</think><answer>B</answer>", 16, 15),
    ("<answer>CABD</answer>", 8, 7),
    ("xy <answer> A", 12, 11),               # ' A' glues the space
    ("12", 1, 1),                            # digits split one by one
])
def test_pretoken_split(text, at, want):
    assert pretoken_split(text, at) == want


def _plp(*items):
    """vLLM prompt_logprobs entries: (token_id, text, logprob) per position, None first."""
    return [None] + [{str(i): {"logprob": lp, "rank": 1, "decoded_token": t}} for i, t, lp in items]


@pytest.mark.parametrize("plp, ids, n_chars, want", [
    (_plp((1, "hi", -9.0), (2, "<answer", -1.0), (3, ">A", -2.0), (4, "</", -0.5), (5, "answer", -0.25),
          (6, ">", -0.125)), None, len("<answer>A</answer>"), -3.875),
    (_plp((1, "x.<", -9.0), (2, "answer", -1.0), (3, ">A", -2.0)), None, len("<answer>A"), -12.0),  # boundary token
    ([None, {"7": {"logprob": -1.0, "decoded_token": "a"}, "8": {"logprob": -0.1, "decoded_token": "b"}}],
     [0, 7], 1, -1.0),                                               # several entries: the prompt token is picked
])
def test_continuation_logprob(plp, ids, n_chars, want):
    assert continuation_logprob(plp, ids, n_chars) == pytest.approx(want)


@pytest.mark.parametrize("value, code", [
    ("data:image/png;base64,iVBORw0KGgo=", None),
    ("iVBORw0KGgo=", None),
    ("data:text/plain;base64,aGVsbG8=", "invalid_image"),
    ("data:image/png,rawbytes", "invalid_image"),
    ("data:image/png;base64,@@@", "invalid_image"),
    ("https://example.com/a.png", "invalid_image"),
    ("/etc/passwd", "invalid_image"),
    ("", "invalid_image"),
    (3, "invalid_image"),
])
def test_image_bytes(value, code):
    if code is None:
        assert image_bytes(value, param="x").startswith(b"\x89PNG")
    else:
        with pytest.raises(ClientError) as err:
            image_bytes(value, param="x")
        assert err.value.status == 400 and err.value.code == code


@pytest.mark.parametrize("url, want", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
    ("https://host/openai/v1", "https://host/openai/v1"),
])
def test_normalize_base_url(url, want):
    assert normalize_base_url(url) == want


def test_bad_base_url_and_unreachable_server():
    with pytest.raises(ConfigError):
        OpenAIEngine("m", base_url="127.0.0.1:8000")
    port = free_port()
    engine = OpenAIEngine("m", base_url=f"http://127.0.0.1:{port}", max_retries=0)
    with pytest.raises(EngineUnavailableError, match="cannot reach") as err:
        engine.served_models()
    assert f"http://127.0.0.1:{port}/v1" in str(err.value) and f"tpru serve --model tpru-3b --port {port}" in str(
        err.value)


# ---------------------------------------------------------------------------------------------- model worker
class Recording(Engine):
    """The real tiny hf engine, recording the batch size of each generate call."""

    name = "hf"

    def __init__(self, engine):
        self.engine, self.batches = engine, []

    def generate(self, requests, options=GenerationOptions()):
        self.batches.append(len(requests))
        return self.engine.generate(requests, options)

    def score(self, request, continuations, *, prefix=""):
        return self.engine.score(request, continuations, prefix=prefix)

    def take_usage(self):  # the worker counts each lone generation's tokens: the inner engine counted them
        return self.engine.take_usage()

    def close(self):
        pass

    def info(self):
        return self.engine.info()


def _request(n: int) -> Request:
    q = ordering.build(n)
    return Request(q, render_prompt(q.problem), tuple(synthetic_frames(n)))


def test_worker_batches_generations_and_isolates_failures(tiny_tpru):
    engine = Recording(tiny_tpru.engine)
    worker = ModelWorker(engine, max_queue=8, max_batch=8)
    gate = threading.Event()
    try:
        blocker = worker.submit(gate.wait)
        opts = GenerationOptions(max_new_tokens=6)
        good = [_request(n) for n in (2, 3, 4)]
        bad = Request(good[0].question, good[0].text, good[0].images[:1])  # placeholder / image mismatch
        futures = [worker.submit_generate(r, opts) for r in [good[0], bad, good[1], good[2]]]
        gate.set()
        done = [f.result(timeout=60) if i != 1 else None for i, f in enumerate(futures)]
        with pytest.raises(ConfigError, match="placeholder"):
            futures[1].result(timeout=60)
        assert blocker.result() is True
        assert engine.batches[0] == 4  # all four queued generations went to the engine together...
        alone = [tiny_tpru.engine.generate([r], opts)[0] for r in good]
        assert [done[0].text, done[2].text, done[3].text] == alone  # ...and the good ones still got their own answers
        # After the failed batch each ran alone, so each has its own count; a batch's count is not split.
        assert all(d.usage.prompt_tokens > 0 and d.usage.generated_tokens >= 1 for d in (done[0], done[2], done[3]))
        gate.clear()
        blocker = worker.submit(gate.wait)
        batched = [worker.submit_generate(r, opts) for r in good[:2]]
        gate.set()
        assert [f.result(timeout=60).usage for f in batched] == [None, None] and engine.batches[-1] == 2
        lone = worker.submit_generate(good[2], opts).result(timeout=60)
        assert engine.batches[-1] == 1 and lone.usage.generated_tokens >= 1
    finally:
        gate.set()
        worker.close()


def test_worker_queue_limit_and_close(tiny_tpru):
    worker = ModelWorker(tiny_tpru.engine, max_queue=2)
    gate = threading.Event()
    first = worker.submit(gate.wait)
    time.sleep(0.05)  # the first job is running, not waiting
    waiting = [worker.submit(lambda: 1), worker.submit(lambda: 2)]
    with pytest.raises(QueueFullError, match="queue is full"):
        worker.submit(lambda: 3)
    assert worker.depth == 2 and worker.stats["rejected"] == 1
    gate.set()
    assert first.result(timeout=5) is True and [f.result(timeout=5) for f in waiting] == [1, 2]
    worker.close()
    with pytest.raises(WorkerClosedError):
        worker.submit(lambda: 4)


@pytest.fixture(scope="module")
def oracle_server():
    """An in-process server around the pixel-reading engine (answers correctly, well formed)."""
    pytest.importorskip("uvicorn")
    from tpru_agent.serve import ServerConfig, create_app

    engine = PixelOracle()
    with serve_in_thread(create_app(TPRU(engine=engine), ServerConfig(served_name="oracle"))) as url:
        yield f"{url}/v1", engine


@pytest.mark.parametrize("mode", ["reason", "fast"])
def test_reason_mode_end_to_end(oracle_server, mode):
    base, engine = oracle_server
    model = TPRU("oracle", engine="openai", base_url=base)
    steps = [frame(s) for s in (3, 1, 4, 2)]
    order = model.order_frames(steps, mode=mode)
    assert order.order == (1, 3, 0, 2) and order.confidence > 0.5
    choice = model.predict_next([frame(1), frame(2)], [frame(5), frame(3)], goal=frame(4), mode=mode)
    assert choice.index == 1 and choice.confidence > 0.9
    assert model.verify_step([frame(1), frame(2)], frame(3), mode=mode).ok
    assert not model.verify_step([frame(1), frame(2)], frame(4), mode=mode).ok
    if mode == "reason":
        assert engine.prefixes[-1] == "<think>steps read from pixels</think>"  # the reasoning reached score
        assert order.raw.startswith("<think>")


def test_full_queue_answers_503():
    import asyncio

    from tpru_agent.serve import ServerConfig, create_app

    app = create_app(TPRU(engine=PixelOracle()), ServerConfig(max_queue=1))
    worker, gate = app.state.worker, threading.Event()
    worker.submit(gate.wait)
    time.sleep(0.05)
    worker.submit(lambda: None)  # one running, one waiting: the queue is full
    body = {"history": [URL, URL], "observation": URL, "mode": "fast"}

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/verify", json=body)

    try:
        resp = asyncio.run(post())
    finally:
        gate.set()
        worker.close()
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "queue_full"


def test_serve_help_is_light():
    from click.testing import CliRunner

    from tpru_agent.cli.main import cli

    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0 and "--api-key" in result.output and "--max-images" in result.output


def test_serve_relay_needs_an_upstream_that_is_not_itself():
    from click.testing import CliRunner

    from tpru_agent.cli.main import cli

    missing = CliRunner().invoke(cli, ["serve", "--model", "tpru-3b", "--engine", "openai"])
    assert missing.exit_code == 1 and "--base-url" in missing.stderr
    loop = CliRunner().invoke(cli, ["serve", "--model", "tpru-3b", "--engine", "openai", "--port", "8123",
                                    "--base-url", "http://127.0.0.1:8123/v1"])
    assert loop.exit_code == 1 and "itself" in loop.stderr
