"""Labelling throughput: ``tpru label`` episodes per minute against ``tpru serve`` at 8 concurrent versus 1.

Starts ``tpru serve`` on the checkpoint of ``--size`` (default the tiny random one; the numbers then measure the
client, HTTP and server overhead rather than a real model), writes ``--episodes`` synthetic episodes of ``--frames``
frames as a frames source, and labels them with ``run_label(engine="openai", concurrency=C)`` for each C.
Each episode costs the covering windows' passes (6 for 8 frames, 20 for 16), one scoring request each.

Example:
    OMP_NUM_THREADS=1 python -m benchmarks label_throughput --quick
    OMP_NUM_THREADS=1 python benchmarks/label_throughput.py --episodes 24 --frames 8 --concurrency 1 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_episodes(root: Path, episodes: int, frames: int, size: tuple[int, int] = (168, 140)) -> str:
    """``episodes`` folders of ``frames`` PNGs (a square moving over a per-episode background); a frames source."""
    if root.exists():
        shutil.rmtree(root)
    w, h = size
    for e in range(episodes):
        rng = np.random.default_rng(e)
        background = rng.integers(30, 200, 3)
        folder = root / f"ep{e:03d}"
        folder.mkdir(parents=True)
        for i in range(frames):
            img = np.empty((h, w, 3), np.uint8)
            img[:] = background
            x = 4 + (w - 40) * i // max(frames - 1, 1)
            img[40:76, x:x + 36] = 255 - background
            img |= rng.integers(0, 8, img.shape, dtype=np.uint8)
            Image.fromarray(img).save(folder / f"frame_{i}.png")
    return f"frames:{root},domain=synthetic"


def measure(model_dir: Path, work: Path, *, episodes: int, frames: int, levels: list[int]) -> dict:
    """Episodes per minute for each concurrency level against one server."""
    from benchmarks.server_load import free_port, start_server, stop_server
    from tpru_agent import TPRU
    from tpru_agent.finetune.eval.label import LabelConfig, run_label

    source = write_episodes(work / "episodes", episodes, frames)
    port = free_port()
    proc = start_server(str(model_dir), port=port, extra=["--served-model-name", "tiny", "--max-logprobs", "5000"])
    base = f"http://127.0.0.1:{port}/v1"
    out: dict = {"episodes": episodes, "frames": frames, "levels": {}}
    try:
        for level in levels:
            target = work / f"labels-c{level}.parquet"
            with TPRU("tiny", engine="openai", base_url=base, concurrency=max(level, 1)) as model:
                started = time.perf_counter()
                summary = run_label(LabelConfig(sources=(source,), out=str(target), model="tiny", engine="openai",
                                                base_url=base, concurrency=level), model=model, overwrite=True)
                wall = time.perf_counter() - started
            out["levels"][str(level)] = {"episodes_per_min": 60 * summary["new_episodes"] / wall, "wall_s": wall,
                                         "rows": summary["rows"], "skipped": len(summary["skipped"])}
    finally:
        stop_server(proc)
    rates = [v["episodes_per_min"] for v in out["levels"].values()]
    if len(rates) > 1:
        out["speedup"] = rates[-1] / rates[0]
    return out


def run(args) -> dict:
    """Benchmark-runner entry (``python -m benchmarks label_throughput``): 24 episodes x 8 frames (``--quick``: 8),
    concurrency 1 and 8, on the tiny checkpoint (``--size`` for another)."""
    from benchmarks import model_folder, workdir

    size = getattr(args, "size", None) or "tiny"
    work = workdir(args) / "label_throughput"
    return measure(model_folder(size, args), work, episodes=8 if getattr(args, "quick", False) else 24, frames=8,
                   levels=[1, 8])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    from benchmarks import model_folder, workdir

    result = measure(model_folder(args.size), workdir() / "label_throughput", episodes=args.episodes,
                     frames=args.frames, levels=args.concurrency)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
