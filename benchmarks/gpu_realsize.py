"""Real-size latency and memory: Qwen2.5-VL-3B / 7B shapes with random weights, bf16 and 4-bit (CPU: mid).

The TPRU weights cannot be downloaded here, and speed does not depend on the values of the weights: this builds
the exact Qwen2.5-VL-3B / 7B architecture (the release configs' shapes; 3.75B / 8.29B parameters) with random
weights on the device, saves it next to the tiny checkpoint's tokenizer and processor, and loads it through the
SDK like a real release (``TPRU(folder, engine="hf")``). Measured per size and precision (bf16 on a GPU, fp32 on
CPU, and bitsandbytes NF4 4-bit):

- ``verify_p50_ms`` / ``verify_p95_ms``: fast-mode ``verify_step`` (2 history frames + the observation), the
  control-loop call; goal p50 <= 25 ms for 3B on an H100.
- ``verify_tpru_form_p50_ms``: the same with TPRU's full next-frame form (goal frame + 3 distractors: 7 images).
- ``order_p50_ms``: fast-mode ``order_frames`` on 4 frames (24 permutations scored).
- ``reason_100_tokens_s``: ``generate`` of exactly 100 new tokens (prefill included) and ``decode_ms_per_token``.
- ``load_s``, ``weights_mib`` (model footprint), ``peak_mib`` (CUDA peak allocation, or process RSS on CPU).

Without a GPU it runs the same measurements on the ``mid`` offline checkpoint (or ``--size``), so the command
and its figures are exercised everywhere. Random weights may decode different tokens than TPRU, but the token
count is pinned (``min_new_tokens``), so the timings carry over.

Run:
    python -m benchmarks gpu_realsize --device cuda                 # 3B and 7B (7-16 GB written to --workdir)
    OMP_NUM_THREADS=1 python -m benchmarks gpu_realsize --repeats 5 # CPU: mid checkpoint, fp32 and 4-bit
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: Shapes of the Qwen2.5-VL-3B / 7B(-Instruct) releases (the TPRU fine-tunes keep them).
REAL_SHAPES = {
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936), out_hidden_size=2048, tie_word_embeddings=True),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064), out_hidden_size=3584, tie_word_embeddings=False),
}
#: The vision tower is the same in both releases.
REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                   fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2)
GOAL_VERIFY_P50_MS = 25.0
_STAMP = "tpru_realsize.json"
_RECIPE = 1
_COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
           "generation_config.json", "special_tokens_map.json")


def realsize_config(size: str, base: dict) -> dict:
    """A Qwen2.5-VL config dict with the real ``size`` shapes, keeping ``base``'s token ids (the tiny tokenizer's).

    Example:
        >>> cfg = realsize_config("3b", {"text_config": {"hidden_size": 128}, "vision_config": {}})
        >>> cfg["text_config"]["num_hidden_layers"], cfg["vision_config"]["out_hidden_size"]
        (36, 2048)
    """
    if size not in REAL_SHAPES:
        raise ValueError(f"size must be one of {sorted(REAL_SHAPES)}, got {size!r}")
    shape = REAL_SHAPES[size]
    cfg = json.loads(json.dumps(base))
    text = cfg.setdefault("text_config", {})
    # layer_types=None: the per-layer list is rebuilt for the new depth (a stale one fails validation).
    text.update(shape["text"], max_position_embeddings=128000, layer_types=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = cfg.setdefault("vision_config", {})
    vision.update(REAL_VISION, out_hidden_size=shape["out_hidden_size"])
    cfg["tie_word_embeddings"] = shape["tie_word_embeddings"]
    cfg["dtype"] = "bfloat16"
    return cfg


def count_parameters(size: str) -> int:
    """Parameters of the real-size architecture, counted on the meta device (no memory, ~1 s)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    base = {"text_config": {}, "vision_config": {}, "model_type": "qwen2_5_vl"}
    config = Qwen2_5_VLConfig.from_dict(realsize_config(size, base))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def build_realsize_checkpoint(path: str | os.PathLike, *, size: str = "3b", device: str = "cuda") -> Path:
    """Write a random-weight Qwen2.5-VL-``size`` checkpoint (bf16, safetensors, Hub layout); reused when complete."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tpru_agent.fsutil import atomic_dir
    from tpru_agent.testing import build_tiny_checkpoint

    target = Path(path).expanduser().resolve()
    stamp = {"recipe": _RECIPE, "size": size}
    if (target / _STAMP).is_file() and json.loads((target / _STAMP).read_text()) == stamp:
        return target
    tiny = build_tiny_checkpoint(target.parent / "tokenizer-tiny", size="tiny", seed=0)
    config = Qwen2_5_VLConfig.from_dict(realsize_config(size, json.loads((tiny / "config.json").read_text())))
    started = time.perf_counter()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    log.info("built %s random weights on %s in %.1f s", size, device, time.perf_counter() - started)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        gc.collect()
        for name in _COPIED:
            if (tiny / name).is_file():
                shutil.copy2(tiny / name, tmp / name)
        (tmp / _STAMP).write_text(json.dumps(stamp))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return target


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure(folder: Path, *, device: str, quantization: str | None, repeats: int, warmup: int) -> dict:
    """Latency and memory of one checkpoint at one precision, through the SDK facade."""
    import torch

    from benchmarks import synthetic_frames, timed
    from tpru_agent import TPRU
    from tpru_agent.engines.base import GenerationOptions, Request
    from tpru_agent.tasks import next_frame, render_prompt

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dtype = "bfloat16" if cuda else "float32"
    t0 = time.perf_counter()
    tpru = TPRU(str(folder), engine="hf", device=device, dtype=dtype, quantization=quantization,
                prefix_cache_mb=0)  # every timed call must pay for its prompt: no cross-call cache
    load_s = time.perf_counter() - t0
    frames = synthetic_frames(8)
    history, obs, goal, others = frames[:2], frames[2], frames[3], frames[4:7]
    out = {"load_s": load_s, "weights_mib": tpru.info().get("memory_bytes", 0) / 2**20}
    v = timed(lambda: tpru.verify_step(history, obs, mode="fast"), repeats=repeats, warmup=warmup, sync=sync)
    out.update(verify_p50_ms=v["p50_ms"], verify_p95_ms=v["p95_ms"])
    v7 = timed(lambda: tpru.verify_step(history, obs, goal=goal, distractors=others, mode="fast"),
               repeats=repeats, warmup=warmup, sync=sync)
    out["verify_tpru_form_p50_ms"] = v7["p50_ms"]
    out["order_p50_ms"] = timed(lambda: tpru.order_frames(frames[:4], mode="fast"), repeats=max(3, repeats // 2),
                                warmup=1, sync=sync)["p50_ms"]
    # Reason mode: exactly 100 new tokens (a random model would otherwise stop at a random end token).
    question = next_frame.build(2, 1)
    request = Request(question, render_prompt(question.problem), tuple(history + [obs]))
    engine = tpru.engine
    if hasattr(engine, "model") and hasattr(engine.model, "generation_config"):
        engine.model.generation_config.min_new_tokens = 100
    gen = timed(lambda: engine.generate([request], GenerationOptions(max_new_tokens=100)),
                repeats=max(2, repeats // 5), warmup=1, sync=sync)
    out["reason_100_tokens_s"] = gen["p50_ms"] / 1000
    out["decode_ms_per_token"] = max(0.0, gen["p50_ms"] - v["p50_ms"]) / 100
    out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib()
    tpru.close()
    del tpru, engine
    gc.collect()
    return out


def run(args) -> dict:
    """The suite entry point (see benchmarks/README.md)."""
    from benchmarks import model_folder, resolve_device

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    if getattr(args, "size_given", False):
        sizes = [args.size]
    else:
        sizes = (["3b-random"] if args.quick else ["3b-random", "7b-random"]) if cuda else ["mid"]
    if not cuda and any(s.endswith("-random") for s in sizes):
        log.warning("real-size shapes on CPU: 7-16 GB of weights and seconds per call")
    precisions = [(("bf16" if cuda else "fp32"), None)]
    if importlib.util.find_spec("bitsandbytes") is not None:
        precisions.append(("4bit", "4bit"))
    repeats = 3 if args.quick else args.repeats
    figures: dict = {"device": device}
    for size in sizes:
        folder = model_folder(size, args, device=device)
        for label, quant in precisions:
            log.info("measuring %s %s on %s", size, label, device)
            figures[f"{size}.{label}"] = measure(folder, device=device, quantization=quant, repeats=repeats,
                                                 warmup=args.warmup)
        if len(precisions) > 1:
            full, q4 = figures[f"{size}.{precisions[0][0]}"], figures[f"{size}.4bit"]
            figures[f"{size}.4bit_vs_{precisions[0][0]}_verify_x"] = full["verify_p50_ms"] / q4["verify_p50_ms"]
            figures[f"{size}.4bit_memory_saving_x"] = full["weights_mib"] / max(q4["weights_mib"], 1e-9)
    if "3b-random.bf16" in figures:
        figures["goal_verify_p50_ms"] = GOAL_VERIFY_P50_MS
        figures["goal_met_3b_bf16"] = figures["3b-random.bf16"]["verify_p50_ms"] <= GOAL_VERIFY_P50_MS
    if len(precisions) == 1:
        figures["note"] = "bitsandbytes not installed: 4-bit not measured"
    return figures
