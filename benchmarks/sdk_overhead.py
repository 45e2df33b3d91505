"""SDK overhead: TPRU(folder).predict_next(..., mode="fast") vs the same computation in plain transformers code.

Both sides answer TPRU's Next-Frame Prediction question (steps 1, 2 and the goal, 4 candidate frames + "None")
from the same PIL frames on the same checkpoint, device and threads:

- ``sdk``: ``TPRU(folder, engine="hf", prefix_cache_mb=0).predict_next(history, candidates, goal=goal,
  mode="fast")``: frame checks, the question, the prompt, one scoring pass, the probabilities and the result.
  The prefix cache is off, so every call does all the work (with it on, a repeated call reuses the whole prompt:
  ``sdk_cache_warm_ms`` shows that case).
- ``bare``: what a user would write by hand (below, in :func:`bare_scorer`): the processor over the templated
  prompt and the frames, one forward with a ``DynamicCache``, the cache repeated for the 5 candidate answers and
  one forward over their tokens, then a softmax. Its prompt and candidate tokens are prepared once, untimed.

Calls alternate (p50 of each side). ``sdk_overhead_pct`` = (sdk / bare - 1) x 100 (goal <= 10);
``bare_vs_sdk_x`` = sdk_ms / bare_ms. ``max_prob_diff`` checks that both sides computed the same answer
distribution.

Run:
    OMP_NUM_THREADS=1 python -m benchmarks sdk_overhead --size mid --repeats 20
"""

from __future__ import annotations

import statistics
import time


def side_by_side(first, second, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Milliseconds of each side over ``repeats`` alternating calls (after ``warmup`` untimed pairs)."""
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        first()
        a.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        second()
        b.append((time.perf_counter() - t0) * 1000)
    return a, b


def next_frame_case(frames: list):
    """TPRU's form: history (steps 1, 2), goal (step 4), 4 candidates; the question and its image order."""
    from tpru_agent.tasks import next_frame

    history, goal, candidates = frames[:2], frames[6], frames[2:6]
    question = next_frame.build(2, 4, with_goal=True)
    return history, goal, candidates, question, [*history, goal, *candidates]


def bare_scorer(folder, device: str, prompt_text: str, images: list, answers: list[str]):
    """Plain transformers scoring of ``answers`` after ``prompt_text``; returns ``call() -> probabilities``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache

    from tpru_agent.sizing import TRAINED_MAX, TRAINED_MIN

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32 if device == "cpu" else
                                                        torch.bfloat16, device_map={"": device}).eval()
    processor = AutoProcessor.from_pretrained(folder, size={"shortest_edge": TRAINED_MIN, "longest_edge": TRAINED_MAX})
    content = []
    for i, part in enumerate(prompt_text.split("<image>")):
        if i:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    # untimed preparation: each answer's tokens after the prompt
    prompt_ids = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0].tolist()
    suffixes = []
    for answer in answers:
        ids = processor(text=[prompt + answer], images=images, return_tensors="pt")["input_ids"][0].tolist()
        if ids[:len(prompt_ids)] != prompt_ids:
            raise RuntimeError("an answer's tokens merge with the prompt's last token; score from their common prefix")
        suffixes.append(ids[len(prompt_ids):])
    width = max(len(s) for s in suffixes) - 1
    pad = processor.tokenizer.pad_token_id or 0
    batch = torch.tensor([s[:-1] + [pad] * (width - len(s) + 1) for s in suffixes], device=device)

    def call() -> list[float]:
        with torch.inference_mode():
            inputs = processor(text=[prompt], images=images, return_tensors="pt").to(device)
            cache = DynamicCache(config=model.config)
            out = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            cache.batch_repeat_interleave(len(suffixes))
            # positions continue from the prompt's M-RoPE offset, which the first call stored (rope_deltas)
            rest = torch.log_softmax(model(input_ids=batch, cache=cache, use_cache=True).logits.float(), dim=-1)
            scores = torch.stack([first[s[0]] + sum(rest[b, j, s[j + 1]] for j in range(len(s) - 1))
                                  for b, s in enumerate(suffixes)])
            return torch.softmax(scores, dim=0).tolist()

    return call, model


def run(args) -> dict:
    """SDK fast ``predict_next`` vs hand-written transformers scoring, side by side."""
    import torch

    from benchmarks import model_folder, resolve_device, synthetic_frames
    from tpru_agent import TPRU
    from tpru_agent.tasks import continuation, render_prompt

    device = resolve_device(args.device)
    folder = model_folder(args.size, args, device=device)
    history, goal, candidates, question, images = next_frame_case(synthetic_frames(7))
    letters = question.answers()
    repeats, warmup = (3, 1) if args.quick else (args.repeats, args.warmup)
    sdk = TPRU(str(folder), engine="hf", device=device, prefix_cache_mb=0)
    bare, bare_model = bare_scorer(folder, device, render_prompt(question.problem), images,
                                   [continuation(a) for a in letters])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def sdk_call():
        result = sdk.predict_next(history, candidates, goal=goal, mode="fast")
        sync()
        return result

    def bare_call():
        result = bare()
        sync()
        return result

    try:
        result, probs = sdk_call(), bare_call()
        diff = max(abs(result.probabilities[a] - p) for a, p in zip(letters, probs))
        sdk_ms, bare_ms = side_by_side(sdk_call, bare_call, repeats, warmup)
        sdk_p50, bare_p50 = statistics.median(sdk_ms), statistics.median(bare_ms)
        figures = {"sdk_p50_ms": round(sdk_p50, 2), "bare_p50_ms": round(bare_p50, 2),
                   "sdk_overhead_pct": round(100 * (sdk_p50 / bare_p50 - 1), 2),
                   "bare_vs_sdk_x": round(sdk_p50 / bare_p50, 3), "max_prob_diff": float(f"{diff:.2e}"),
                   "goal_met": sdk_p50 <= 1.10 * bare_p50, "images": len(images), "answers": len(letters)}
        sdk.close()
        warm = TPRU(str(folder), engine="hf", device=device)  # default prefix cache: the whole prompt is reused
        warm.predict_next(history, candidates, goal=goal, mode="fast")
        figures["sdk_cache_warm_ms"] = round(statistics.median(
            side_by_side(lambda: warm.predict_next(history, candidates, goal=goal, mode="fast"), sync, repeats, 0)[0]), 2)
        warm.close()
    finally:
        sdk.close()
        del bare_model
    return figures
