"""The benchmark suite: one module per benchmark, each exposing ``run(args) -> dict``; run them all with
``python -m benchmarks`` (or ``tpru bench``). The protocol is in benchmarks/README.md.

This package also holds the helpers every benchmark shares: timing with percentiles, the checkpoint for a
``--size``, synthetic frames, and thread pinning (two shared cores swing 20-30x without it).

Example:
    >>> from benchmarks import timed
    >>> stats = timed(lambda: sum(range(1000)), repeats=5, warmup=1)
    >>> sorted(stats)
    ['max_ms', 'mean_ms', 'min_ms', 'p50_ms', 'p95_ms', 'repeats']
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

#: ``--size`` values: the offline tiny / mid checkpoints, or real Qwen2.5-VL shapes with random weights.
SIZES = ("tiny", "mid", "3b-random", "7b-random")


def pin_threads(n: int) -> None:
    """Pin BLAS / OpenMP / torch / tokenizers to ``n`` threads (environment first, then a loaded torch)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def timed(fn: Callable[[], object], *, repeats: int = 20, warmup: int = 2,
          sync: Callable[[], object] | None = None) -> dict[str, float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; latency figures in milliseconds.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs after each call inside the timed region, so asynchronous
    GPU work is counted.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": percentile(samples, 50), "p95_ms": percentile(samples, 95),
            "mean_ms": sum(samples) / len(samples), "min_ms": min(samples), "max_ms": max(samples),
            "repeats": float(repeats)}


def workdir(args=None) -> Path:
    """The suite's scratch / cache folder: ``args.workdir``, ``$TPRU_BENCH_DIR``, or ``~/.cache/tpru-agent/bench``."""
    chosen = getattr(args, "workdir", None) or os.environ.get("TPRU_BENCH_DIR")
    path = Path(chosen) if chosen else Path.home() / ".cache" / "tpru-agent" / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_folder(size: str, args=None, *, device: str = "cpu") -> Path:
    """The checkpoint folder for a ``--size``, built once and cached under :func:`workdir`.

    ``tiny`` / ``mid`` are the offline random checkpoints of :mod:`tpru_agent.testing`; ``3b-random`` /
    ``7b-random`` have Qwen2.5-VL-3B / 7B shapes with random weights (see ``benchmarks/gpu_realsize.py``;
    7-16 GB on disk, built on ``device``).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if size in ("tiny", "mid"):
        from tpru_agent.testing import build_tiny_checkpoint

        return build_tiny_checkpoint(workdir(args) / size, size=size, seed=0)
    from benchmarks.gpu_realsize import build_realsize_checkpoint

    return build_realsize_checkpoint(workdir(args) / size, size=size.split("-")[0], device=device)


def synthetic_frames(count: int = 4, size: tuple[int, int] = (196, 168)) -> list:
    """``count`` distinct frames inside TPRU's pixel budget (:func:`tpru_agent.testing.synthetic_frames`)."""
    from tpru_agent.testing import synthetic_frames as frames

    return frames(count, size)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu`` (imports torch only for ``auto`` / ``cuda``)."""
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda" if device == "auto" else device
    if device == "auto":
        return "cpu"
    raise RuntimeError(f"device {device!r} was asked for but torch sees no CUDA device here")


__all__ = ["SIZES", "model_folder", "percentile", "pin_threads", "resolve_device", "synthetic_frames", "timed",
           "workdir"]
