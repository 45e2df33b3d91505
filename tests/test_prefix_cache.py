"""The hf engine's cross-call prefix cache: matching by content, LRU within a byte budget, and results equal to a
plain uncached forward on real request sequences (orderings, choices after reasoning, a checker's sliding window)."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from conftest import synthetic_frames

from tpru_agent.engines.base import GenerationOptions, Request
from tpru_agent.engines.prefix_cache import match_length
from tpru_agent.errors import ConfigError
from tpru_agent.tasks import continuation, next_frame, ordering, render_prompt

PERMUTATIONS = ["".join(p) for p in itertools.permutations("ABCD")]
#: Cached vs uncached score tolerance (log-probability, per candidate), by engine dtype. The cached path computes
#: the prompt and the candidates in separate forwards, so the floating-point sums run in another order.
#: fp32: measured <= 3e-6 on the tiny model. bf16 (8-bit mantissa, ~0.4% per operation, compounding over the
#: layers): <= 5e-6 on the tiny model, but 0.022 on the real-size 3B (P(ok) 0.5302 cached vs 0.5418 uncached);
#: 0.05 leaves twice that margin. The README's "Engines" section states the same.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
TOL = TOLERANCE["float32"]


# ----------------------------------------------------------------------------------------------- pure matching
@pytest.mark.parametrize("a, b, expected", [
    (([1, 2, 3], ()), ([1, 2, 3], ()), 3),                                        # identical text
    (([1, 2, 3], ()), ([1, 2, 3, 4, 5], ()), 3),                                  # a is a prefix of b
    (([1, 2, 3], ()), ([1, 5, 3], ()), 1),                                        # text differs at 1
    (([], ()), ([1], ()), 0),
    (([1, 9, 9, 2], ((1, 3, "x"),)), ([1, 9, 9, 2], ((1, 3, "x"),)), 4),          # same image
    (([1, 9, 9, 2], ((1, 3, "x"),)), ([1, 9, 9, 2], ((1, 3, "y"),)), 1),          # other image, same pads
    (([1, 9, 9, 2, 9, 9], ((1, 3, "x"), (4, 6, "y"))),
     ([1, 9, 9, 2, 9, 9], ((1, 3, "x"), (4, 6, "z"))), 4),                        # second image differs
    (([1, 9, 9, 2, 9, 9], ((1, 3, "x"), (4, 6, "y"))),
     ([1, 9, 9, 3, 9, 9], ((1, 3, "x"), (4, 6, "z"))), 3),                        # text differs first
    (([1, 9, 9, 2], ((1, 3, "x"),)), ([1, 9], ((1, 3, "x"),)), 2),                # partial image of the same frame
    (([1, 9, 9, 2], ()), ([1, 9, 9, 2], ((1, 3, "x"),)), 1),                      # generated pads are text, not x
])
def test_match_length_compares_images_by_content(a, b, expected):
    ids_a, spans_a = np.asarray(a[0]), a[1]
    ids_b, spans_b = np.asarray(b[0]), b[1]
    assert match_length(ids_a, spans_a, ids_b, spans_b) == expected
    assert match_length(ids_b, spans_b, ids_a, spans_a) == expected


# ----------------------------------------------------------------------------------------------- the LRU itself
def _kv(torch, tokens: int):
    """A real DynamicCache of one layer holding ``tokens`` positions (1 x 1 head x 4 dims, fp32: 32 bytes/token)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, tokens, 4), torch.zeros(1, 1, tokens, 4), 0)
    return cache


def test_lru_budget_supersede_and_features():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tpru_agent.engines.prefix_cache import PrefixCache, fork, kv_nbytes

    cache = PrefixCache(budget_bytes=32 * 25)                 # room for 25 tokens
    a, b, c = np.arange(10), np.arange(12), np.arange(100, 110)
    cache.put(a, (), _kv(torch, 10))
    cache.put(b, (), _kv(torch, 12))                           # extends a: a is dropped, not kept twice
    assert cache.info()["prefixes"] == 1 and cache.info()["bytes"] == 32 * 12
    assert cache.lookup(np.arange(11), ())[0] == 11
    cache.put(c, (), _kv(torch, 10))
    assert cache.info()["bytes"] == 32 * 22
    cache.put(np.arange(200, 208), (), _kv(torch, 8))           # over budget: the least recently used (b) goes
    info = cache.info()
    assert info["evictions"] == 1 and info["bytes"] <= cache.budget and info["prefixes"] == 2
    assert cache.lookup(np.arange(12), ()) == (0, None)
    cache.put(np.arange(300, 330), (), _kv(torch, 30))          # alone larger than the budget: not kept
    assert cache.info()["too_large"] == 1
    cache.put_feature("img", "features", 64)
    assert cache.feature("img") == "features" and cache.feature("other") is None
    stored = cache.lookup(c, ())[1]
    view = fork(stored, 4)
    view.update(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), 0)
    assert view.get_seq_length() == 6 and stored.get_seq_length() == 10 and kv_nbytes(stored) == 320
    cache.clear()
    assert cache.info()["bytes"] == 0 and cache.info()["prefixes"] == cache.info()["images"] == 0
    off = PrefixCache(0)
    off.put(a, (), _kv(torch, 10))
    off.put_feature("img", "features", 64)
    assert not off.enabled and off.lookup(a, ()) == (0, None) and off.feature("img") is None


# ----------------------------------------------------------------------------------------------- on the tiny model
torch = pytest.importorskip("torch", reason="the hf engine needs the [hf] extra")
pytest.importorskip("transformers", reason="the hf engine needs the [hf] extra")
from tpru_agent.engines.hf import HFEngine  # noqa: E402


@pytest.fixture(scope="module")
def cached(tiny_checkpoint):
    eng = HFEngine(tiny_checkpoint)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def frames8():
    """8 distinct frames: 4 of the moving square, then the same 4 flipped upside down (same size and budget)."""
    frames = synthetic_frames(4)
    return frames + [f.transpose(1) for f in frames]


def reference(engine, request, continuations, prefix=""):
    """Plain transformers, no cache of any kind: the processor and one full forward per candidate sequence."""
    proc, model = engine.processor, engine.model
    encode = [proc(text=[engine.chat_text(request, reply=prefix + c)], images=list(request.images) or None,
                   return_tensors="pt") for c in continuations]
    bare = proc(text=[engine.chat_text(request, reply=prefix)], images=list(request.images) or None,
                return_tensors="pt")["input_ids"][0].tolist()
    seqs = [e["input_ids"][0].tolist() for e in encode]
    shared = 0
    while (shared < len(bare) and all(len(s) > shared + 1 for s in seqs)
           and len({s[shared] for s in seqs} | {bare[shared]}) == 1):
        shared += 1
    out = []
    with torch.no_grad():
        for enc, seq in zip(encode, seqs):
            logp = torch.log_softmax(model(**enc).logits[0].float(), dim=-1)
            out.append(sum(float(logp[j - 1, seq[j]]) for j in range(shared, len(seq))))
    return out


def assert_close(got, want, tol: float = TOL):
    assert len(got) == len(want)
    assert max(abs(g - w) for g, w in zip(got, want)) < tol, (got, want)


def order_request(frames, description=None) -> Request:
    q = ordering.build(len(frames), description=description)
    return Request(q, render_prompt(q.problem), tuple(frames))


def verify_request(history, goal, observation, description="move the square to the right") -> Request:
    """What ``TPRU.verify_step`` (and so ``ProcedureChecker.observe``) asks: history + goal, one candidate + none."""
    q = next_frame.build(len(history), 1, with_goal=True, description=description)
    return Request(q, render_prompt(q.problem), (*history, goal, observation))


def test_ordering_scores_equal_uncached_on_miss_and_full_hit(cached, frames8):
    cached.clear_cache()
    request = order_request(frames8[:4], description="moving the square")
    continuations = [continuation(p) for p in PERMUTATIONS]
    want = reference(cached, request, continuations)
    before = cached.cache_info()
    first = cached.score(request, continuations)
    second = cached.score(request, continuations)            # every prompt token comes from the cache
    assert_close(first, want)
    assert_close(second, want)
    info = cached.cache_info()
    assert info["hits"] - before["hits"] == 1 and info["image_hits"] - before["image_hits"] == 4
    assert info["reused_tokens"] - before["reused_tokens"] > 400


def test_bf16_cached_scores_stay_within_the_bf16_tolerance(tiny_checkpoint, frames8):
    """The bf16 engine is held to its own stated tolerance (cached and full-hit calls against the plain forward)."""
    engine = HFEngine(tiny_checkpoint, dtype="bf16")
    try:
        tol = TOLERANCE[engine.info()["dtype"]]
        assert tol == 5e-2
        continuations = [continuation(p) for p in PERMUTATIONS]
        for frames in (frames8[:4], frames8[2:6]):
            request = order_request(frames, description="moving the square")
            want = reference(engine, request, continuations)
            assert_close(engine.score(request, continuations), want, tol)
            assert_close(engine.score(request, continuations), want, tol)
    finally:
        engine.close()


def test_choice_letters_after_reasoning_reuse_the_prompt(cached, frames8):
    cached.clear_cache()
    q = next_frame.build(2, 4, with_goal=True, description="moving the square to the right")
    request = Request(q, render_prompt(q.problem), tuple(frames8[:7]))
    continuations = [continuation(letter) for letter in q.answers()]
    reasoning = "<think>Step 3 must show the square between steps 2 and 4.</think>\n"
    plain = cached.score(request, continuations)
    before = cached.cache_info()["reused_tokens"]
    after = cached.score(request, continuations, prefix=reasoning)
    assert_close(plain, reference(cached, request, continuations))
    assert_close(after, reference(cached, request, continuations, prefix=reasoning))
    assert cached.cache_info()["reused_tokens"] - before > 300, "the prompt before the reasoning was run again"


def test_checker_sliding_window_sequence_equals_uncached(cached, frames8):
    """Window 4 slides over an episode; rejected frames keep the history (the observation alone changes)."""
    cached.clear_cache()
    goal, accepted = frames8[7], [frames8[0]]
    continuations = [continuation(letter) for letter in ("A", "B")]
    before = cached.cache_info()
    for step, frame in enumerate(frames8[1:7], start=1):
        history = accepted[-4:]
        request = verify_request(history, goal, frame)
        assert_close(cached.score(request, continuations), reference(cached, request, continuations))
        if step != 4:                                          # frame 4 is "rejected": the window stays
            accepted.append(frame)
        else:
            other = frames8[6].transpose(0)                    # a different frame at the same place
            retry = verify_request(history, goal, other)
            assert_close(cached.score(retry, continuations), reference(cached, retry, continuations))
    info = cached.cache_info()
    # every frame is encoded once: 9 distinct images (frames 0-6, the goal, the retry), the rest come from the cache
    assert info["image_misses"] - before["image_misses"] == 9
    assert info["reused_tokens"] > before["reused_tokens"]


def test_a_different_image_at_the_same_place_stops_the_match(cached, frames8):
    cached.clear_cache()
    continuations = [continuation(p) for p in PERMUTATIONS[:6]]
    first = order_request(frames8[:4])
    cached.score(first, continuations)
    swapped = order_request([frames8[0], frames8[1], frames8[5], frames8[3]])   # same tokens, third image differs
    before = cached.cache_info()["reused_tokens"]
    got = cached.score(swapped, continuations)
    assert_close(got, reference(cached, swapped, continuations))
    visual = cached._visual(swapped.images)
    ids = cached.processor.tokenizer(cached._expand(cached.chat_text(swapped), visual),
                                     add_special_tokens=False)["input_ids"]
    third = cached._spans(ids, visual)[2][0]
    assert cached.cache_info()["reused_tokens"] - before == third


def test_generate_then_score_after_reasoning(cached, tiny_checkpoint, frames8):
    cached.clear_cache()
    request = order_request(frames8[:4])
    options = GenerationOptions(max_new_tokens=24)
    with HFEngine(tiny_checkpoint, prefix_cache_mb=0) as plain:
        want_text = plain.generate([request], options)
    cached.score(request, [continuation(p) for p in PERMUTATIONS[:3]])          # a prompt prefix in the cache
    text = cached.generate([request], options)
    assert text == want_text and cached.generate([request], options) == want_text
    continuations = [continuation(p) for p in PERMUTATIONS[:5]]
    before = cached.cache_info()["reused_tokens"]
    got = cached.score(request, continuations, prefix=text[0])
    assert_close(got, reference(cached, request, continuations, prefix=text[0]))
    assert cached.cache_info()["reused_tokens"] - before > 400


def test_eviction_under_a_tiny_budget(tiny_checkpoint, frames8):
    # one 4-frame prompt of the tiny model is ~0.45 MiB of keys/values: 0.6 MiB holds one prompt, never two
    with HFEngine(tiny_checkpoint, prefix_cache_mb=0.6) as small:
        continuations = [continuation(p) for p in PERMUTATIONS[:4]]
        for frames in (frames8[:4], frames8[4:8], frames8[2:6], frames8[:4]):
            request = order_request(list(frames))
            assert_close(small.score(request, continuations), reference(small, request, continuations))
        info = small.cache_info()
        assert info["evictions"] > 0 and 0 < info["bytes"] <= info["budget_bytes"] and info["prefixes"] <= 1


def test_disabled_cache_keeps_nothing_and_equals_uncached(tiny_checkpoint, frames8):
    with HFEngine(tiny_checkpoint, prefix_cache_mb=0) as off:
        request = order_request(frames8[:4])
        continuations = [continuation(p) for p in PERMUTATIONS[:8]]
        for _ in range(2):
            assert_close(off.score(request, continuations), reference(off, request, continuations))
        info = off.cache_info()
        assert info["budget_bytes"] == 0 and info["bytes"] == 0 and info["hits"] == 0
        assert info["reused_tokens"] == 0 and info["image_hits"] == 0
        assert off.info()["prefix_cache_bytes"] == 0
    with pytest.raises(ConfigError, match="prefix_cache_mb"):
        HFEngine(tiny_checkpoint, prefix_cache_mb=-1)


def test_threads_sharing_one_engine_get_serial_results(cached, frames8):
    cached.clear_cache()
    requests = [order_request(list(frames8[i:i + 4])) for i in range(4)]
    continuations = [continuation(p) for p in PERMUTATIONS[:6]]
    want = [reference(cached, r, continuations) for r in requests]
    got: dict[int, list[float]] = {}

    def work(i):
        got[i] = cached.score(requests[i % 4], continuations)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert_close(got[i], want[i % 4])


def test_procedure_checker_events_match_without_cache(tiny_checkpoint, cached, frames8):
    from tpru_agent import TPRU, ProcedureChecker

    cached.clear_cache()
    with HFEngine(tiny_checkpoint, prefix_cache_mb=0) as off:
        checkers = [ProcedureChecker(TPRU(engine=eng), reference=frames8[:6], description="move the square",
                                     window=4, threshold=0.01) for eng in (cached, off)]
        for frame in frames8:
            on_event, off_event = (c.observe(frame) for c in checkers)
            assert on_event.status == off_event.status
            assert on_event.confidence == pytest.approx(off_event.confidence, abs=1e-4)
    assert cached.cache_info()["hits"] >= 5


@pytest.mark.slow
def test_benchmarks_run_quick_on_the_tiny_checkpoint(tmp_path, tiny_checkpoint):
    """sdk_overhead, fast_vs_reason and cache end to end (smoke: figures present and consistent, not speed)."""
    import json
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import __main__ as suite

    shutil.copytree(tiny_checkpoint, tmp_path / "work" / "tiny")
    out = tmp_path / "all.json"
    code = suite.main(["sdk_overhead", "fast_vs_reason", "cache", "--size", "tiny", "--quick", "--warmup", "1",
                       "--no-record", "--json", str(out), "--workdir", str(tmp_path / "work")])
    results = json.loads(out.read_text())["results"]
    assert code == 0, {k: v["error"] for k, v in results.items()}
    sdk = results["sdk_overhead"]["figures"]
    assert sdk["max_prob_diff"] < 1e-4 and sdk["sdk_p50_ms"] > 0 and sdk["bare_p50_ms"] > 0
    fvr = results["fast_vs_reason"]["figures"]
    assert fvr["reason_tokens"] == 64 and fvr["reason_p50_ms"] > fvr["fast_p50_ms"] > 0
    cache = results["cache"]["figures"]
    assert cache["checker_hold.reused_pct"] > cache["checker_accept.reused_pct"] > 0
    assert cache["proposed_accept.tokens_run_per_call"] < cache["checker_accept.tokens_run_per_call"]
