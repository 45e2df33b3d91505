"""Fast mode (one scoring pass) vs reason mode (a chain of thought, then scoring) on the same frames and model.

The question is TPRU's Next-Frame Prediction (steps 1, 2 and the goal, 4 candidates + "None"; 7 images).

- ``fast``: ``TPRU.predict_next(..., mode="fast")``: the 5 answers scored after the prompt in one pass.
- ``reason``: what ``TPRU.ask`` does in reason mode: ``engine.generate`` (greedy) then ``engine.score`` of the 5
  answers after the generated reasoning. A random-weight model writes no parseable answer, and may stop at any
  token or never, so the reasoning is forced to a fixed budget of 256 new tokens (``ignore_eos``; 64 with
  ``--quick``) and the two engine calls are timed directly (the SDK around them adds ~1%: see sdk_overhead).
  (TPRU was trained with responses of up to 1,024 tokens; 256 is a modest reasoning length.)

Both sides run with the engine's default prefix cache, emptied before every call (each call is cold, as for new
frames in a loop): reason's final scoring reuses the prompt + reasoning that ``generate`` left in the cache, as it
does in real use. ``fast_vs_reason_x`` = reason_ms / fast_ms (goal >= 10).
``reason_ms_per_token`` is the decoding slope (from a second, 16-token generation) and ``tokens_for_10x`` the
reasoning length at which reason mode costs 10 fast calls on this machine: on a CPU the prompt (7 images) is
compute-bound while a decoding step is cheap, so the ratio grows with the reasoning length, not the model.

Run:
    OMP_NUM_THREADS=1 python -m benchmarks fast_vs_reason --size mid
"""

from __future__ import annotations

import statistics
import time

REASON_TOKENS = 256


def run(args) -> dict:
    """Time both modes on one checkpoint; reason calls interleaved with batches of fast calls."""
    import torch

    from benchmarks import model_folder, resolve_device, synthetic_frames
    from benchmarks.sdk_overhead import next_frame_case
    from tpru_agent import TPRU
    from tpru_agent.engines.base import GenerationOptions, Request
    from tpru_agent.tasks import continuation, render_prompt

    device = resolve_device(args.device)
    folder = model_folder(args.size, args, device=device)
    budget = 64 if args.quick else REASON_TOKENS
    history, goal, candidates, question, images = next_frame_case(synthetic_frames(7))
    model = TPRU(str(folder), engine="hf", device=device, ignore_eos=True, max_new_tokens=budget)
    request = Request(question, render_prompt(question.problem), tuple(images))
    answers = [continuation(a) for a in question.answers()]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def fast():
        model.engine.clear_cache()
        model.predict_next(history, candidates, goal=goal, mode="fast")
        sync()

    def reason() -> tuple[float, float]:
        model.engine.clear_cache()
        t0 = time.perf_counter()
        raw = model.engine.generate([request], model.options)[0]
        sync()
        t1 = time.perf_counter()
        cut = raw.find("<answer>")
        model.engine.score(request, answers, prefix=raw[:cut] if cut >= 0 else raw)
        sync()
        return (time.perf_counter() - t0) * 1000, (t1 - t0) * 1000

    n_reason = 1 if args.quick else max(2, min(args.repeats // 5, 4))
    per_reason = 3 if args.quick else max(2, args.repeats // n_reason)
    try:
        for _ in range(args.warmup):
            fast()
        reason()  # untimed: first decode allocations
        short = []
        for _ in range(2):
            model.engine.clear_cache()
            t0 = time.perf_counter()
            model.engine.generate([request], GenerationOptions(max_new_tokens=16))
            sync()
            short.append((time.perf_counter() - t0) * 1000)
        fast_ms, reason_ms, generate_ms = [], [], []
        for _ in range(n_reason):
            total, gen = reason()
            reason_ms.append(total)
            generate_ms.append(gen)
            for _ in range(per_reason):
                t0 = time.perf_counter()
                fast()
                fast_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        model.close()
    return _summary(fast_ms, reason_ms, generate_ms, short, budget)


def _summary(fast_ms: list[float], reason_ms: list[float], generate_ms: list[float], short: list[float],
             budget: int) -> dict:
    """The report: medians, the per-token decode cost (reason generation minus a 16-token one) and the ratio."""
    fast_p50, reason_p50 = statistics.median(fast_ms), statistics.median(reason_ms)
    per_token = (statistics.median(generate_ms) - min(short)) / (budget - 16)
    fixed = reason_p50 - budget * per_token
    return {"fast_p50_ms": round(fast_p50, 1), "reason_p50_ms": round(reason_p50, 1),
            "reason_generate_p50_ms": round(statistics.median(generate_ms), 1),
            "reason_ms_per_token": round(per_token, 2), "reason_tokens": budget,
            "fast_vs_reason_x": round(reason_p50 / fast_p50, 2), "goal_met": reason_p50 >= 10 * fast_p50,
            "tokens_for_10x": int(max(0.0, 10 * fast_p50 - fixed) / max(per_token, 1e-9)) + 1,
            "fast_calls": len(fast_ms), "reason_calls": len(reason_ms)}
