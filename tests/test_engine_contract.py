"""The engine contract (``tpru_agent.engines.base.Engine``), held to the same cases for every engine.

classic (no weights), hf (the tiny checkpoint), onnx (its ONNX export) and openai (against ``tpru serve`` of the
tiny checkpoint, in process): output lengths and types of ``generate`` / ``score``, an empty continuation list,
repeated continuations, a prefix, a placeholder / image count mismatch, a closed engine, ``info()``. Then the
options each engine refuses (it validates its own; the facade filters nothing).
"""

from __future__ import annotations

import math

import pytest
from conftest import serve_in_thread, synthetic_frames

from tpru_agent import TPRU, ConfigError, EngineClosedError
from tpru_agent.engines import ENGINES, create_engine
from tpru_agent.engines.base import Engine, GenerationOptions, Request
from tpru_agent.tasks import continuation, next_frame, ordering, render_prompt

KINDS = ("classic", "hf", "onnx", "openai")
KEY = "contract-key"
OPTS = GenerationOptions(max_new_tokens=4)


@pytest.fixture(scope="session")
def served_tiny(tiny_checkpoint):
    """``tpru serve`` of the tiny checkpoint (hf engine) on a loopback port: the openai engine's server."""
    pytest.importorskip("uvicorn")
    from tpru_agent.serve import ServerConfig, create_app

    model = TPRU(tiny_checkpoint, max_new_tokens=8)
    with serve_in_thread(create_app(model, ServerConfig(api_key=KEY))) as url:
        yield url
    model.close()


def make(kind: str, request) -> Engine:
    """A fresh engine of ``kind`` (the fixtures it needs are built on first use, once per session)."""
    if kind == "classic":
        return create_engine("classic", None)
    if kind == "hf":
        pytest.importorskip("torch")
        return create_engine("hf", request.getfixturevalue("tiny_checkpoint"), device="cpu")
    if kind == "onnx":
        return create_engine("onnx", request.getfixturevalue("onnx_dir"), device="cpu", threads=1)
    pytest.importorskip("openai")
    return create_engine("openai", None, base_url=request.getfixturevalue("served_tiny") + "/v1", api_key=KEY,
                         max_retries=0)


@pytest.fixture(scope="module", params=KINDS)
def engine(request):
    e = make(request.param, request)
    yield e
    e.close()


def ask(question, images=None) -> Request:
    images = synthetic_frames(question.n_images) if images is None else images
    return Request(question, render_prompt(question.problem), tuple(images))


ORDER = ask(ordering.build(4))
NEXT = ask(next_frame.build(2, 3, with_goal=False))


def test_every_engine_kind_is_covered():
    assert set(ENGINES) == set(KINDS)


def test_is_an_engine_with_info(engine):
    assert isinstance(engine, Engine) and engine.name in KINDS
    info = engine.info()
    assert isinstance(info, dict) and info["engine"] == engine.name


def test_generate_returns_one_string_per_request(engine):
    texts = engine.generate([ORDER, NEXT], OPTS)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert engine.generate([], OPTS) == []


@pytest.mark.parametrize("request_, prefix", [(ORDER, ""), (NEXT, ""), (ORDER, "<think>the drawer opens</think>")],
                         ids=["ordering", "next", "prefix"])
def test_score_returns_one_finite_float_per_continuation(engine, request_, prefix):
    conts = [continuation(a) for a in request_.question.answers()]
    scores = engine.score(request_, conts, prefix=prefix)
    assert isinstance(scores, list) and len(scores) == len(conts)
    assert all(isinstance(v, float) and math.isfinite(v) and v <= 1e-6 for v in scores)


def test_no_continuations_score_nothing(engine):
    assert engine.score(ORDER, []) == []
    assert engine.score(ORDER, [], prefix="<think>x</think>") == []


def test_repeated_continuations_are_refused(engine):
    with pytest.raises(ConfigError, match="distinct"):
        engine.score(ORDER, [continuation("ABCD"), continuation("BACD"), continuation("ABCD")])


def test_an_image_count_mismatch_is_refused(engine):
    short = Request(ORDER.question, ORDER.text, ORDER.images[:3])
    with pytest.raises(ConfigError):
        engine.score(short, [continuation("ABCD"), continuation("BACD")])
    with pytest.raises(ConfigError):
        engine.generate([short], OPTS)


@pytest.mark.parametrize("kind", KINDS)
def test_a_closed_engine_raises_a_typed_error(kind, request):
    e = make(kind, request)
    e.close()
    e.close()  # idempotent
    with pytest.raises(EngineClosedError):
        e.score(ORDER, [continuation("ABCD"), continuation("BACD")])
    with pytest.raises(EngineClosedError):
        e.generate([ORDER], OPTS)


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("kind, target", [("classic", None), ("onnx", "unused"), ("openai", None)])
def test_quantization_is_refused_outside_hf(kind, target):
    with pytest.raises(ConfigError, match=r"quantization='4bit' applies to the hf engine only; for ONNX export with "
                                          r"`tpru export --int8`"):
        create_engine(kind, target, quantization="4bit")


@pytest.mark.parametrize("kind, option, value", [
    ("classic", "dtype", "bf16"), ("onnx", "dtype", "fp16"), ("openai", "dtype", "bf16"),
    ("openai", "device", "cuda"), ("onnx", "device", "tpu"), ("classic", "device", "gpu0"),
])
def test_options_an_engine_cannot_honour_are_named(kind, option, value):
    with pytest.raises(ConfigError, match=option if option == "dtype" else "device"):
        create_engine(kind, None if kind != "onnx" else "unused", **{option: value})


def test_the_facade_passes_options_through_unfiltered():
    with pytest.raises(ConfigError, match="applies to the hf engine only"):
        TPRU("classic", quantization="8bit")
    model = TPRU("classic", device="cuda")  # the classic engine runs on the CPU whichever device is named
    assert model.info()["engine"] == "classic" and model.info()["device"] == "cpu"


def test_a_custom_engine_needs_generate_and_score_and_gets_the_rest():
    class Scores:
        name = "mine"

        def generate(self, requests, options=OPTS):
            return ["<answer>A</answer>" for _ in requests]

        def score(self, request, continuations, *, prefix=""):
            return [0.0 for _ in continuations]

    with pytest.raises(ConfigError, match="lacks score"):
        TPRU(engine=type("OnlyGenerate", (), {"generate": lambda self, r, o=None: []})())
    model = TPRU(engine=Scores())
    assert isinstance(model.engine, Engine) and model.info()["engine"] == "mine"
    model.close()
    with pytest.raises(EngineClosedError):
        model.engine.score(ORDER, ["a"])


# ------------------------------------------------------------------------------------------ token usage
def test_usage_counts_the_tokens_a_score_and_a_generate_processed(kind_engine):
    kind, e = kind_engine
    e.take_usage()  # start from zero on this thread
    conts = [continuation(a) for a in NEXT.question.answers()]
    e.score(NEXT, conts)
    scored = e.take_usage()
    assert e.take_usage() == type(scored)()  # taking resets
    e.generate([ORDER], OPTS)
    generated = e.take_usage()
    if kind == "classic":  # no language model, no tokens
        assert scored.to_dict() == generated.to_dict() == {"prompt_tokens": 0, "image_tokens": 0,
                                                           "generated_tokens": 0}
        return
    if not (scored.prompt_tokens or generated.prompt_tokens) and kind == "openai":
        pytest.skip("this openai engine does not report token usage")
    assert scored.prompt_tokens > len(conts) and scored.generated_tokens == 0
    assert generated.prompt_tokens > 0 and 1 <= generated.generated_tokens <= 4
    if kind != "openai":  # a server's usage reply need not split out image tokens
        # 5 images of the tiny model's 196x168 frames: a fresh engine computes every one of their tokens
        assert scored.image_tokens > 0 and scored.prompt_tokens > scored.image_tokens + len(conts) - 1
        assert generated.prompt_tokens > generated.image_tokens > 0


def test_usage_is_counted_per_thread(kind_engine):
    import threading

    kind, e = kind_engine
    if kind == "classic":
        pytest.skip("the classic engine counts no tokens")
    e.take_usage()
    seen = {}
    worker = threading.Thread(target=lambda: (e.score(NEXT, [continuation("A"), continuation("B")]),
                                              seen.setdefault("usage", e.take_usage())))
    worker.start()
    worker.join()
    assert seen["usage"].prompt_tokens > 0 and e.take_usage().prompt_tokens == 0  # nothing leaked to this thread


@pytest.fixture(params=KINDS)
def kind_engine(request):
    """A fresh engine (empty caches: its first prompt is computed in full) and its kind."""
    e = make(request.param, request)
    yield request.param, e
    e.close()
