"""ONNX Runtime vs PyTorch on CPU, same model and inputs: prefill, per-token decode, fast-mode score, answers.

The checkpoint (``mid`` by default) is exported with ``tpru_agent.onnx.export`` (fp32, and int8 = ORT dynamic
quantisation of the decoder) for the frame size of the synthetic frames (196x168), so both runtimes see the same
pixels and token ids. Each pair is timed side by side (calls alternate, p50 of each side), on ``--threads``
threads (1 by default). Ratios read "how many times faster ONNX Runtime is": ``torch_ms / ort_ms``.

- ``vision_*``: the vision encoder on 4 frames (torch: one batched call, as the hf engine runs it; ORT: one
  frame per run). ``prefill_*``: the decoder over the whole 4-frame ordering prompt (~440 tokens), logits of the
  last position. ``decode_*``: one token on the prompt's key/value cache, per token. ``score_*``: the engines'
  fast-mode ``score`` of the 24 permutations end to end (caches cleared before every call).
- ``agree_*``: answers on a fixed set of 8 questions (4 task forms): fast mode (argmax of ``score``) and greedy
  ``generate`` of 32 tokens, ONNX vs hf. ``score_diff_max`` is the largest |log-prob| difference; int8's
  ``logit_drift_max`` / ``logit_drift_rel`` are the largest last-position logit change vs fp32 ORT (absolute, and
  over the logits' standard deviation). Goals: fp32 >= 1.2x, int8 >= 2.5x.

Run:
    OMP_NUM_THREADS=1 python -m benchmarks onnx_vs_torch --size mid --repeats 10
"""

from __future__ import annotations

import copy
import logging
import statistics
import time

log = logging.getLogger(__name__)


def _side_by_side(torch_fn, ort_fn, repeats: int, warmup: int) -> tuple[float, float]:
    """p50 milliseconds of each side, calls alternating so both see the same machine load."""
    for _ in range(warmup):
        torch_fn()
        ort_fn()
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch_fn()
        a.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        ort_fn()
        b.append((time.perf_counter() - t0) * 1000)
    return statistics.median(a), statistics.median(b)


def questions(frames: list) -> list:
    """The fixed 8-question set (:func:`tpru_agent.testing.sample_requests`)."""
    from tpru_agent.testing import sample_requests

    return sample_requests(frames)


def fast_answer(engine, request) -> tuple[str, list[float]]:
    """The fast-mode answer (argmax of ``score`` over every valid answer) and the scores."""
    from tpru_agent.tasks import continuation

    answers = request.question.answers()
    scores = engine.score(request, [continuation(a) for a in answers])
    return answers[max(range(len(scores)), key=scores.__getitem__)], scores


def _torch_parts(hf, request):
    """Inputs shared by both runtimes: embeddings with the image features, M-RoPE positions, pixel inputs."""
    torch = hf._torch
    model = hf.model
    inputs = hf.processor(text=[hf.chat_text(request)], images=list(request.images), return_tensors="pt")
    ids = inputs["input_ids"]
    with torch.inference_mode():
        embeds = model.model.get_input_embeddings()(ids)
        feats = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        mask = ids == model.config.image_token_id
        embeds[mask] = feats
        positions, delta = model.model.get_rope_index(ids, mm_token_type_ids=mask.int(),
                                                      image_grid_thw=inputs["image_grid_thw"])
    return inputs, embeds, positions, int(delta.reshape(-1)[0])


def _timings(hf, engines: dict, request, args) -> dict:
    from tpru_agent.tasks import continuation

    repeats, warmup = (3, 1) if args.quick else (args.repeats, args.warmup)
    torch_calls, (embeds, positions, n, delta) = _torch_calls(hf, request)
    conts = [continuation(a) for a in request.question.answers()]
    torch_calls["score"] = lambda: hf.score(request, conts)
    figures: dict = {"prompt_tokens": n, "threads": args.threads}
    for label, engine in engines.items():
        ort_calls = _ort_calls(engine, request, conts, embeds.numpy(), positions.numpy(), n, delta)
        for name in ("vision", "prefill", "decode", "score"):
            t_ms, o_ms = _side_by_side(torch_calls[name], ort_calls[name], repeats, warmup)
            figures[f"{label}.{name}_torch_ms"] = round(t_ms, 2)
            figures[f"{label}.{name}_ort_ms"] = round(o_ms, 2)
            figures[f"{label}.{name}_ort_vs_torch_x"] = round(t_ms / o_ms, 2)
    return figures


def _torch_calls(hf, request) -> tuple[dict, tuple]:
    """The torch side's vision / prefill / one-step decode calls, and (embeds, positions, tokens, rope delta)."""
    from transformers import DynamicCache

    torch, model = hf._torch, hf.model
    inputs, embeds, positions, delta = _torch_parts(hf, request)
    n = embeds.shape[1]

    def torch_vision():
        with torch.inference_mode():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

    def torch_prefill():
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return cache

    base = torch_prefill()
    step_ids = torch.tensor([[100]])
    step_pos = torch.full((3, 1, 1), n + delta)

    def torch_step():
        cache = copy.copy(base)  # the layers are shared, then replaced below: copying costs nothing
        cache.layers = [copy.copy(layer) for layer in base.layers]
        with torch.inference_mode():
            model(input_ids=step_ids, position_ids=step_pos, cache=cache, use_cache=True)

    calls = {"vision": torch_vision, "prefill": torch_prefill, "decode": torch_step}
    return calls, (embeds, positions, n, delta)


def _ort_calls(engine, request, conts, e_np, p_np, n: int, delta: int) -> dict:
    """The onnx engine's vision / prefill / one-step decode / score calls on the same inputs as the torch side."""
    import numpy as np

    pixels = [engine._pixels(im) for im in request.images]
    index = np.asarray([n - 1])
    _, kv = engine._decode(e_np, p_np, n, index, None)
    step_embed = engine._embed([100])
    step_p = np.full((3, 1, 1), n + delta, dtype=np.int64)

    def ort_vision():
        for p in pixels:
            engine.sessions["vision"].run(None, {"pixels": p})

    def ort_step():
        engine._decode(step_embed, step_p, n + 1, np.zeros(1, dtype=np.int64), kv)

    def ort_score():
        engine.clear_cache()
        engine.score(request, conts)

    return {"vision": ort_vision, "prefill": lambda: engine._decode(e_np, p_np, n, index, None),
            "decode": ort_step, "score": ort_score}


def _agreement(hf, engines: dict, reqs: list, tokens: int) -> dict:
    import numpy as np

    from tpru_agent.engines.base import GenerationOptions

    opts = GenerationOptions(max_new_tokens=tokens)
    ref = [fast_answer(hf, r) for r in reqs]
    ref_text = [hf.generate([r], opts)[0] for r in reqs]
    out: dict = {"questions": len(reqs)}
    last_logits: dict = {}
    for label, engine in engines.items():
        got = [fast_answer(engine, r) for r in reqs]
        text = [engine.generate([r], opts)[0] for r in reqs]
        out[f"{label}.agree_fast"] = sum(a[0] == b[0] for a, b in zip(ref, got))
        out[f"{label}.agree_greedy_{tokens}tok"] = sum(a == b for a, b in zip(ref_text, text))
        out[f"{label}.score_diff_max"] = float(max(np.abs(np.subtract(a[1], b[1])).max() for a, b in zip(ref, got)))
        last_logits[label] = []
        for r in reqs:
            engine.clear_cache()
            prompt = engine.chat_text(r)
            from tpru_agent.engines.chat import expand_image_pads

            ids = engine._encode(expand_image_pads(prompt, [engine.frame_tokens] * len(r.images)))
            logp, _, _ = engine._prefill(ids, r.images)
            last_logits[label].append(logp)
    if "int8" in engines and "fp32" in engines:
        # log-softmax differs from logits by a per-row constant; remove it to compare logits.
        drift = [np.abs((a - a.mean()) - (b - b.mean())).max() for a, b in zip(last_logits["fp32"], last_logits["int8"])]
        spread = [a.std() for a in last_logits["fp32"]]
        out["int8.logit_drift_max"] = float(max(drift))
        out["int8.logit_drift_rel"] = float(max(d / s for d, s in zip(drift, spread)))
    return out


def run(args) -> dict:
    """Export the checkpoint (fp32 and int8), then time and compare both runtimes on the same inputs."""
    from benchmarks import model_folder, pin_threads, synthetic_frames, workdir
    from tpru_agent.engines.hf import HFEngine
    from tpru_agent.engines.onnx import ONNXEngine
    from tpru_agent.onnx.export import export_onnx, quantize_onnx

    size = args.size if args.size_given else ("tiny" if args.quick else "mid")
    pin_threads(args.threads)
    folder = model_folder(size, args)
    root = workdir(args)
    fp32 = export_onnx(folder, root / f"onnx-{size}-fp32", frame_size="196x168", overwrite=True)
    int8 = quantize_onnx(fp32, root / f"onnx-{size}-int8", overwrite=True)
    hf = HFEngine(folder, device="cpu", prefix_cache_mb=0)  # time the work, not cache hits
    engines = {"fp32": ONNXEngine(fp32, device="cpu", threads=args.threads),
               "int8": ONNXEngine(int8, device="cpu", threads=args.threads)}
    frames = synthetic_frames(4)
    reqs = questions(frames)
    figures = {"size": size, "parameters": engines["fp32"].manifest["parameters"]}
    figures.update(_timings(hf, engines, reqs[0], args))
    figures.update(_agreement(hf, engines, reqs[:3] if args.quick else reqs, 8 if args.quick else 32))
    return figures
