"""``tpru serve`` and the openai engine: a real server subprocess on the tiny checkpoint, driven over loopback.

Checks: every task call through ``TPRU(engine="openai")`` equals the local hf engine (fast: same answers and
probabilities; reason: same text, or the same ParseError on the random model); the task routes over plain HTTP;
bad requests get 4xx JSON errors; the three score methods (``tpru_score``, vLLM's ``prompt_logprobs`` and
``top_logprobs``) against the served model; a 1,000-request load test. The parts that need no server subprocess
(pure helpers, the model worker, reason mode against an in-process server, the CLI) are in test_server_inprocess.py.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import httpx
import pytest
from conftest import TINY_MAX_NEW, synthetic_frames
from oracle import frame

from tpru_agent import TPRU, ParseError
from tpru_agent.engines.base import GenerationOptions, Request
from tpru_agent.engines.openai import OpenAIEngine, image_data_url
from tpru_agent.tasks import continuation, next_frame, ordering, render_prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.server_load import free_port, run_load, start_server, stop_server  # noqa: E402

KEY = "test-key-123"
MAX_NEW = TINY_MAX_NEW  # served with the local tiny_tpru's limit, so their answers compare


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------------- served subprocess
@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    port = free_port()
    proc = start_server(tiny_checkpoint, port=port, env={"TPRU_API_KEY": KEY}, extra=[
        "--served-model-name", "tiny", "--max-images", "8", "--max-body-mb", "2", "--max-logprobs", "5000",
        "--max-new-tokens", str(MAX_NEW)])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def remote(served, **kw) -> TPRU:
    return TPRU("tiny", engine="openai", base_url=served + "/v1", api_key=KEY, max_new_tokens=MAX_NEW, **kw)


def test_health_and_models(served, http):
    health = httpx.get(served + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == "tiny" and health["engine"] == "hf"
    models = http.get("/v1/models").json()["data"]
    assert [(m["id"], m["owned_by"]) for m in models] == [("tiny", "tpru-agent")]


def _outcome(call):
    try:
        return "ok", call()
    except ParseError as exc:
        return "parse", exc.raw


TASKS = {
    "order4": lambda t, f: t.order_frames(f[:4]),
    "order5": lambda t, f: t.order_frames(f),  # windows
    "next": lambda t, f: t.predict_next(f[:2], f[2:4], goal=f[4]),
    "previous": lambda t, f: t.review_previous(f[2:4], f[:2], description="stacking blocks"),
    "verify": lambda t, f: t.verify_step(f[:2], f[2], distractors=[f[3]]),
}


@pytest.mark.parametrize("mode", ["fast", "reason"])
def test_openai_engine_matches_local(mode, served, tiny_tpru):
    frames = synthetic_frames(5)
    client = remote(served)
    assert client.engine.is_tpru_server()
    for name, task in TASKS.items():
        def run(model):
            return task(_Moded(model, mode), frames)
        want, got = _outcome(lambda: run(tiny_tpru)), _outcome(lambda: run(client))
        assert got[0] == want[0], name
        if want[0] == "parse":
            assert got[1] == want[1], name  # the same greedy text came back
            continue
        a, b = want[1].to_dict(), got[1].to_dict()
        assert b["engine"] == "openai" and b["mode"] == mode
        for key in ("order", "answer", "index", "letter", "ok", "raw"):
            assert a.get(key) == b.get(key), (name, key)
        assert b["confidence"] == pytest.approx(a["confidence"], abs=1e-5), name
    client.close()


class _Moded:
    """Calls the facade's task methods with a fixed mode."""

    def __init__(self, model, mode):
        self.model, self.mode = model, mode

    def __getattr__(self, name):
        method = getattr(self.model, name)
        return lambda *a, **kw: method(*a, mode=self.mode, **kw)


def test_task_routes(http, tiny_tpru):
    frames = synthetic_frames(4)
    urls = [image_data_url(f) for f in frames]
    got = http.post("/v1/verify", json={"history": urls[:2], "observation": png_b64(frames[2]), "mode": "fast"})
    assert got.status_code == 200, got.text
    want = tiny_tpru.verify_step(frames[:2], frames[2], mode="fast")
    assert got.json()["ok"] == want.ok and got.json()["confidence"] == pytest.approx(want.confidence, abs=1e-6)
    # how it was made travels, under the served name: the checkpoint's local path never leaves the server
    assert got.json()["settings"]["model"] == "tiny" and got.json()["choice"]["settings"]["model"] == "tiny"
    assert got.json()["settings"]["mode"] == "fast" and got.json()["usage"]["prompt_tokens"] > 0
    assert str(tiny_tpru.model_name) not in got.text
    order = http.post("/v1/order", json={"frames": urls, "mode": "fast", "description": "a square moving"}).json()
    assert sorted(order["order"]) == [0, 1, 2, 3] and order["engine"] == "hf"
    nxt = http.post("/v1/next", json={"history": urls[:2], "candidates": urls[2:], "goal": urls[3], "mode": "fast",
                                      "none_position": 0}).json()
    assert set(nxt["options"]) == {"A", "B", "C"} and nxt["options"]["A"] is None
    prev = http.post("/v1/previous", json={"later": urls[1:3], "candidates": [urls[0], urls[3]], "mode": "fast"})
    assert prev.status_code == 200 and sum(prev.json()["probabilities"].values()) == pytest.approx(1.0)
    reason = http.post("/v1/order", json={"frames": urls, "mode": "reason"})  # random weights: no <answer>
    assert reason.status_code == 422 and reason.json()["error"]["type"] == "parse_error"


def _chat(images, **extra):
    parts = [{"type": "text", "text": "Order: "}] + [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 4, **extra}


URL = image_data_url(frame(1))
EPS = "data:image/png;base64," + base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n").decode()


def _huge_png() -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(buf, format="PNG")  # 9 Mpx in ~30 KB: a cheap decompression bomb
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


BAD_REQUESTS = [
    ("postscript is not decoded", "post", "/v1/order", {"json": {"frames": [URL, EPS]}}, 400, "invalid_image"),
    ("over-large image", "post", "/v1/order", {"json": {"frames": [URL, _huge_png()]}}, 413, "image_too_large"),
    ("max_tokens over the limit", "post", "/v1/chat/completions", {"json": _chat([URL], max_tokens=32768)}, 400,
     "max_tokens_too_large"),
    ("malformed json", "post", "/v1/chat/completions", {"content": b'{"model": "tiny", "messages": [}'}, 400,
     "invalid_json"),
    ("too many images", "post", "/v1/verify", {"json": {"history": [URL] * 8, "observation": URL}}, 400,
     "too_many_images"),
    ("too many chat images", "post", "/v1/chat/completions", {"json": _chat([URL] * 9)}, 400, "too_many_images"),
    ("non-image data url", "post", "/v1/order", {"json": {"frames": [URL, "data:text/plain;base64,aGk="]}}, 400,
     "invalid_image"),
    ("not an image", "post", "/v1/order", {"json": {"frames": [URL, base64.b64encode(b"not a png").decode()]}},
     400, "invalid_image"),
    ("remote url", "post", "/v1/chat/completions", {"json": _chat(["http://127.0.0.1:1/x.png"])}, 400,
     "invalid_image"),
    ("unknown field", "post", "/v1/order", {"json": {"frames": [URL, URL], "speed": 3}}, 400, "invalid_field"),
    ("bad mode", "post", "/v1/order", {"json": {"frames": [URL, URL], "mode": "slow"}}, 400, "invalid_field"),
    ("tool message", "post", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}}, 400, None),
    ("unknown model", "post", "/v1/chat/completions", {"json": {**_chat([URL]), "model": "gpt-9"}}, 404,
     "model_not_found"),
    ("too large", "post", "/v1/order", {"content": b"x" * (3 << 20)}, 413, "body_too_large"),
    ("too large chunked", "post", "/v1/order", {"content": iter([b"x" * (1 << 20)] * 3)}, 413, "body_too_large"),
    ("wrong key", "post", "/v1/order", {"json": {"frames": [URL, URL]}, "headers": {"Authorization": "Bearer no"}},
     401, "invalid_api_key"),
    ("no key", "get", "/v1/models", {"headers": {"Authorization": ""}}, 401, "invalid_api_key"),
    ("unknown route", "get", "/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("name, method, path, kwargs, status, code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests(http, name, method, path, kwargs, status, code):
    resp = getattr(http, method)(path, **kwargs) if method == "get" else http.post(path, **kwargs)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in resp.text
    if code is not None:
        assert body["error"]["code"] == code


def test_score_methods_against_the_server(served, tiny_tpru):
    frames = synthetic_frames(4)
    q = next_frame.build(2, 2, with_goal=False, none_position=-1)
    req = Request(q, render_prompt(q.problem), tuple(frames))
    letters = q.answers()
    conts = [continuation(a) for a in letters]
    want = tiny_tpru.engine.score(req, conts)
    exact = OpenAIEngine("tiny", base_url=served, api_key=KEY, score_method="tpru")
    assert exact.score(req, conts) == pytest.approx(want, abs=1e-6)
    # vLLM's prompt_logprobs method: exact up to a term shared by every continuation.
    plp = OpenAIEngine("tiny", base_url=served, api_key=KEY, score_method="prompt_logprobs").score(req, conts)
    assert [v - plp[0] for v in plp] == pytest.approx([v - want[0] for v in want], abs=1e-4)
    # vLLM's top_logprobs method: the log-prob of the first distinguishing token ('>A', '>B', ...).
    top = OpenAIEngine("tiny", base_url=served, api_key=KEY, score_method="top_logprobs", top_logprobs=5000)
    first = tiny_tpru.engine.score(req, [">" + a for a in letters], prefix="<answer")
    assert top.score(req, conts) == pytest.approx(first, abs=1e-4)
    # With the reasoning prefix too (reason mode scores after the generated text).
    prefix = "<think>the square moves right</think>\n"
    want_prefixed = tiny_tpru.engine.score(req, conts, prefix=prefix)
    assert exact.score(req, conts, prefix=prefix) == pytest.approx(want_prefixed, abs=1e-6)


def test_chat_generation_and_logprobs(http, tiny_tpru):
    frames = synthetic_frames(2)
    body = _chat([image_data_url(f) for f in frames], max_tokens=6, logprobs=True, top_logprobs=3)
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    q = ordering.build(2)
    text = "Order: <image><image>"
    want = tiny_tpru.engine.generate([Request(q, text, tuple(frames))], GenerationOptions(max_new_tokens=6))[0]
    assert choice["message"]["content"] == want
    tokens = choice["logprobs"]["content"]
    assert bytes(b for t in tokens for b in t["bytes"]).decode("utf-8", errors="replace") == want
    assert all(len(t["top_logprobs"]) == 3 and t["logprob"] <= t["top_logprobs"][0]["logprob"] + 1e-6
               for t in tokens)
    plain = http.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None}).json()
    assert plain["choices"][0]["message"]["content"] == want and plain["choices"][0]["logprobs"] is None


@pytest.mark.slow
def test_load_1000_requests_16_concurrent(served):
    """1,000 fast-mode verify calls (a new observation frame each) at 16 concurrent: every one answered."""
    before = httpx.get(served + "/health").json()["stats"]["done"]
    report = run_load(served, workload="verify", requests=1000, concurrency=16, api_key=KEY)
    print("\n" + report.line())
    assert report.errors == 0 and report.statuses == {"200": 1000}, report.first_errors
    stats = httpx.get(served + "/health").json()["stats"]
    assert stats["done"] - before == 1000 and stats["rejected"] == 0
