"""The openai engine's transport (the official ``openai`` client) against real loopback HTTP servers.

A scripted stdlib ``http.server`` answers each request with the next canned reply and records what came in: the
errors the client raises come back as this package's typed errors (with the fix in the message), retries are the
client's and are counted on the wire, the key travels (or no Authorization header at all without one), vLLM
fields go in the request body, and ``usage`` is read back. The model itself runs in tests/test_server.py.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import synthetic_frames

from tpru_agent import ConfigError, EngineUnavailableError
from tpru_agent.engines.base import GenerationOptions, Request
from tpru_agent.engines.openai import OpenAIEngine, ServerError
from tpru_agent.errors import ModelNotFoundError
from tpru_agent.tasks import ordering, render_prompt

pytest.importorskip("openai")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.server_load import free_port  # noqa: E402

MODELS = {"object": "list", "data": [{"id": "tiny-vl", "object": "model", "created": 0, "owned_by": "vllm"}]}
OPTS = GenerationOptions(max_new_tokens=4)


def completion(text: str = "<answer>1 2</answer>", usage: dict | None = None, **extra) -> dict:
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "tiny-vl", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            **extra}


class Scripted:
    """A real HTTP server on a free loopback port: GET /v1/models lists MODELS; each POST takes the next reply."""

    def __init__(self, replies: list[tuple[int, dict | str, dict]], *, delay: float = 0.0):
        self.replies, self.delay, self.posts = list(replies), delay, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, MODELS, {})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(raw)))
                time.sleep(outer.delay)
                status, body, headers = outer.replies.pop(0) if outer.replies else (200, completion(), {})
                self._send(status, body, headers)

            def _send(self, status, body, headers):
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json" if isinstance(body, dict) else "text/plain")
                self.send_header("content-length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def ask() -> Request:
    q = ordering.build(2)
    return Request(q, render_prompt(q.problem), tuple(synthetic_frames(2)))


def error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


def test_connection_refused_names_the_url_and_how_to_start_a_server():
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = OpenAIEngine("m", base_url=url, max_retries=0)
    with pytest.raises(EngineUnavailableError) as err:
        engine.generate([ask()], OPTS)
    assert url in str(err.value) and "tpru serve" in str(err.value) and "vLLM" in str(err.value)
    engine.close()


def test_a_timeout_is_engine_unavailable_and_says_raise_timeout():
    with Scripted([], delay=1.0) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, timeout=0.2, max_retries=0)
        with pytest.raises(EngineUnavailableError, match="timeout="):
            engine.generate([ask()], OPTS)
        engine.close()


def test_a_timed_out_generation_is_not_sent_again_but_a_refused_one_is():
    with Scripted([], delay=1.0) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, timeout=0.3, max_retries=2)
        with pytest.raises(EngineUnavailableError, match="timed out"):
            engine.generate([ask()], OPTS)
        assert len(srv.posts) == 1  # the server may still be decoding it: never twice
        engine.close()
    with Scripted([(503, error("queue full"), {}), (200, completion("<answer>2 1</answer>"), {})]) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, max_retries=2)
        assert engine.generate([ask()], OPTS) == ["<answer>2 1</answer>"] and len(srv.posts) == 2
        engine.close()


def test_a_generation_retry_follows_the_servers_retry_headers():
    with Scripted([(429, error("slow down"), {"retry-after": "1.2"}), (200, completion(), {})]) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, max_retries=2)
        started = time.monotonic()
        engine.generate([ask()], OPTS)
        assert len(srv.posts) == 2 and time.monotonic() - started >= 1.2  # Retry-After, not the 0.5 s back-off
        engine.close()
    with Scripted([(503, error("do not"), {"x-should-retry": "false"})]) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, max_retries=2)
        with pytest.raises(ServerError):
            engine.generate([ask()], OPTS)
        assert len(srv.posts) == 1
        engine.close()
    with Scripted([(408, error("slow client"), {"retry-after-ms": "10"}), (200, completion(), {})]) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, max_retries=1)
        engine.generate([ask()], OPTS)
        assert len(srv.posts) == 2
        engine.close()


def test_401_is_a_config_error_about_the_api_key():
    with Scripted([(401, error("bad key"), {})]) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, api_key="wrong", max_retries=3)
        with pytest.raises(ConfigError) as err:
            engine.generate([ask()], OPTS)
        assert "api_key" in str(err.value) and "bad key" in str(err.value) and "HTTP 401" in str(err.value)
        assert len(srv.posts) == 1  # a 401 is not retried
        assert srv.posts[0][1]["authorization"] == "Bearer wrong"
        engine.close()


def test_retries_are_honoured_and_counted_on_the_wire():
    fast = {"retry-after-ms": "10"}
    with Scripted([(503, error("busy"), fast), (200, completion("<answer>2 1</answer>"), {})]) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, max_retries=1)
        assert engine.generate([ask()], OPTS) == ["<answer>2 1</answer>"]
        assert len(srv.posts) == 2
        engine.close()
    with Scripted([(503, error("busy"), fast)] * 3) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, max_retries=1)
        with pytest.raises(ServerError, match="HTTP 503: busy") as err:
            engine.generate([ask()], OPTS)
        assert err.value.status == 503 and len(srv.posts) == 2  # one try and one retry, no more
        engine.close()


def test_bad_request_is_a_config_error_carrying_the_servers_message():
    with Scripted([(400, error("max_tokens is too large: 9999 > 4096"), {})]) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url)
        with pytest.raises(ConfigError, match="max_tokens is too large: 9999 > 4096"):
            engine.generate([ask()], OPTS)
        engine.close()


def test_unknown_model_lists_the_served_ones_with_a_close_match():
    with Scripted([(404, error("The model `tiny_vl` does not exist."), {})]) as srv:
        engine = OpenAIEngine("tiny_vl", base_url=srv.url)
        with pytest.raises(ModelNotFoundError) as err:
            engine.generate([ask()], OPTS)
        assert "['tiny-vl']" in str(err.value) and "Did you mean 'tiny-vl'?" in str(err.value)
        engine.close()


def test_no_key_sends_no_authorization_and_openai_api_key_is_not_read(monkeypatch):
    monkeypatch.delenv("TPRU_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai-key")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-secret")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-secret")
    with Scripted([]) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url)
        engine.generate([ask()], OPTS)
        sent = srv.posts[0][1]
        assert "authorization" not in sent and "openai-organization" not in sent and "openai-project" not in sent
        engine.close()
        monkeypatch.setenv("TPRU_API_KEY", "from-env")
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, headers={"X-Team": "robots"})
        engine.generate([ask()], OPTS)
        assert srv.posts[1][1]["authorization"] == "Bearer from-env" and srv.posts[1][1]["x-team"] == "robots"
        engine.close()
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, headers={"OpenAI-Project": "mine"})  # the user's own
        engine.generate([ask()], OPTS)
        assert srv.posts[2][1]["openai-project"] == "mine" and "openai-organization" not in srv.posts[2][1]
        engine.close()


def test_vllm_fields_travel_in_the_body_and_extensions_come_back():
    plp = [None, {"7": {"logprob": -0.5, "rank": 1, "decoded_token": "x"}},
           {"9": {"logprob": -0.25, "rank": 1, "decoded_token": "B"}}]
    with Scripted([(200, completion("", prompt_logprobs=plp, prompt_token_ids=[1, 7, 9]), {})]) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, score_method="prompt_logprobs")
        assert engine.score(ask(), ["B"]) == [-0.25]
        body = srv.posts[0][2]
        assert body["prompt_logprobs"] == 0 and body["return_token_ids"] is True
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert body["messages"][-1] == {"role": "assistant", "content": "B"} and "tpru_question" not in body
        engine.close()


def test_usage_is_added_to_the_engines_count():
    usage = {"prompt_tokens": 120, "completion_tokens": 7, "total_tokens": 127}
    plp = [None, {"9": {"logprob": -0.25, "rank": 1, "decoded_token": "A"}}]
    scored = completion("", usage={"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51},
                        prompt_logprobs=plp, prompt_token_ids=[1, 9])
    with Scripted([(200, completion(usage=usage), {})] * 2 + [(200, scored, {})] * 2) as srv:
        engine = OpenAIEngine("tiny-vl", base_url=srv.url, score_method="prompt_logprobs")
        engine.take_usage()
        engine.generate([ask(), ask()], OPTS)  # two requests, answered on the engine's pool threads
        got = engine.take_usage()  # ...and counted on this one
        assert got.to_dict() == {"prompt_tokens": 240, "image_tokens": 0, "generated_tokens": 14}
        assert engine.take_usage().to_dict() == {"prompt_tokens": 0, "image_tokens": 0, "generated_tokens": 0}
        assert engine.score(ask(), ["A", "B"]) == [-0.25, -0.25]
        # Scoring generates nothing: the token vLLM decodes to answer is not counted.
        assert engine.take_usage().to_dict() == {"prompt_tokens": 100, "image_tokens": 0, "generated_tokens": 0}
        engine.close()
