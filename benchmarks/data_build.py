"""Samples per minute of ``tpru data build`` from frames on disk (goal: >= 2,000/min on 2 cores).

Writes camera-like episodes (640x480 JPEG frames: gradient, moving objects, sensor noise) to a temporary folder,
then times a full build (ingest: decode, resize to the TPRU budget, PNG-encode, thumbnails; plan; render shards)
with the default settings, and prints the figure with the time of each phase.

    OMP_NUM_THREADS=1 python benchmarks/data_build.py --episodes 80 --workers 2
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


def write_episodes(root: Path, episodes: int, frames: int, size=(640, 480)) -> None:
    tasks = ["stack the blocks", "open the drawer", "pour the cup", "wipe the table"]
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for e in range(episodes):
        rng = np.random.default_rng(e)
        folder = root / f"ep{e:04d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(f'{{"description": "{tasks[e % 4]}", "domain": "robot"}}')
        base = rng.integers(40, 200, 3)
        background = (base + 40 * np.sin(xx[..., None] / (50 + e) + yy[..., None] / 70)).clip(0, 255)
        for f in range(frames):
            noisy = (background + rng.normal(0, 6, background.shape)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(noisy)
            draw = ImageDraw.Draw(img)
            t = f / max(frames - 1, 1)
            draw.ellipse([80 + 400 * t, 200 - 120 * t, 180 + 400 * t, 300 - 120 * t], fill=(230, 40, 40))
            draw.rectangle([300, 320, 300 + 200 * t + 20, 380], fill=(40, 40, 230))
            img.save(folder / f"frame_{f:03d}.jpg", quality=90)


def _cpu() -> float:
    """User + system CPU seconds of this process and its finished children (the worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Timer:
    """Build progress that records when each phase starts."""

    def __init__(self):
        self.marks: list[tuple[str, float]] = []

    def start(self, key, label, total):
        self.marks.append((key, time.perf_counter()))

    def advance(self, key, steps=1, note=""):
        pass


def measure(episodes: int, frames: int, workers: int, samples_per_episode: int) -> dict:
    """Time one full build from frames on disk; wall-clock and CPU figures."""
    from tpru_agent.finetune.data.build import BuildConfig, build

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "episodes"
        write_episodes(src, episodes, frames)
        cfg = BuildConfig(sources=(f"frames:{src},domain=robot",), out=str(Path(tmp) / "out"), workers=workers,
                          samples_per_episode=samples_per_episode)
        timer = Timer()
        cpu0 = _cpu()
        start = time.perf_counter()
        result = build(cfg, progress=timer)
        wall = time.perf_counter() - start
        cpu = _cpu() - cpu0
        render = dict(timer.marks).get("render", start + wall)
        size = sum(p.stat().st_size for p in result.out.rglob("*.parquet"))
    samples = sum(result.manifest["samples"].values())
    return {"episodes": episodes, "frames_per_episode": frames, "workers": workers, "samples": samples,
            "ingest_plan_s": render - start, "render_s": start + wall - render, "total_s": wall,
            "dataset_mb": size / 1e6, "samples_per_min": samples / wall * 60, "cpu_ms_per_sample": cpu / samples * 1000,
            "samples_per_min_2_idle_cores_estimate": samples / (cpu / 2) * 60, "load_average": os.getloadavg()[0]}


def run(args) -> dict:
    """Benchmark-runner entry (``python -m benchmarks data_build``): 80 episodes (``--quick``: 10), 2 workers."""
    return measure(10 if args.quick else 80, 16, 2, 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=80)
    parser.add_argument("--frames", type=int, default=16, help="frames per episode on disk")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples-per-episode", type=int, default=6)
    args = parser.parse_args()
    r = measure(args.episodes, args.frames, args.workers, args.samples_per_episode)
    print(f"episodes {args.episodes} x {args.frames} frames (640x480 jpg), workers {args.workers}, "
          f"{args.samples_per_episode} samples/episode, {os.cpu_count()} cpus")
    print(f"ingest+plan {r['ingest_plan_s']:.1f} s, render {r['render_s']:.1f} s, total {r['total_s']:.1f} s, "
          f"{r['samples']} samples, {r['dataset_mb']:.1f} MB")
    print(f"samples/min: {r['samples_per_min']:.0f} wall-clock  (goal >= 2000; load average now "
          f"{r['load_average']:.1f} on {os.cpu_count()} cpus)")
    print(f"cpu {r['cpu_ms_per_sample']:.0f} ms/sample: {r['samples_per_min_2_idle_cores_estimate']:.0f} samples/min "
          "on 2 otherwise idle cores")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
