"""Learning check (not CI): held-out accuracy of a random-init tiny Qwen2.5-VL rising above chance, SFT then GRPO.

The task is TPRU's Temporal Reordering on synthetic procedures a small model can learn from pixels: each episode
is a bar growing over ``--frames`` steps (random colours, widths and positions, pixel noise), the frames are shown
shuffled and labelled A, B, C..., and the answer is the label permutation (chance = 1 / frames!). The run goes
through the product path: a TPRU-layout dataset on disk, ``tpru_agent.finetune.train.job`` with ``method=sft+grpo``
(a supervised warm-up that teaches the answer format, then GRPO with the TPRU reward), held-out greedy accuracy
every ``--eval-steps`` steps in ``metrics.jsonl``. Figures: the curve (held-out accuracy per stage and step),
chance, the best and final accuracy, and the ratio to chance.

Defaults (chosen on this CPU, one seed): 150 warm-up steps teach the format (held-out accuracy ~0.24), then 200
GRPO steps at lr 5e-5 with the ``tpru_partial`` reward and 64-token completions. A shorter warm-up leaves GRPO
with too few correct samples to learn from; lr 3e-4 broke the answer format; 48-token completions were clipped
(the format is only 0.02 of the reward, so GRPO does not protect it). Frames are 56x56 px (4 visual tokens) to
keep the run at a few minutes: off TPRU's pixel budget on purpose.

    OMP_NUM_THREADS=1 python benchmarks/learning.py --workdir /tmp/tpru-learning      # ~4 minutes on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks learning --size tiny      # the same through the suite runner
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

#: Frames of 56x56 px (the budget's min and max): 4 visual tokens each, so a tiny model learns in minutes.
FRAME_PIXELS = 56 * 56

os.environ.setdefault("OMP_NUM_THREADS", "1")


def episode_frames(rng: random.Random, steps: int, size: int = 84):
    """One procedure: a bar growing over ``steps`` frames, with episode-level colour / geometry and pixel noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    colour = tuple(rng.randint(80, 255) for _ in range(3))
    background = tuple(rng.randint(0, 60) for _ in range(3))
    left = rng.randint(4, size // 3)
    width = rng.randint(size // 5, size // 2)
    frames = []
    for t in range(steps):
        image = Image.new("RGB", (size, size), background)
        height = int((size - 12) * (t + 1) / steps)
        ImageDraw.Draw(image).rectangle([left, size - 4 - height, left + width, size - 4], fill=colour)
        noise = np.random.default_rng(rng.randint(0, 2 ** 31)).normal(0, 8, (size, size, 3))
        frames.append(Image.fromarray((np.asarray(image, dtype=np.float32) + noise).clip(0, 255).astype(np.uint8)))
    return frames


def write_task(root: Path, *, frames: int, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A TPRU-layout dataset of ``frames``-frame orderings (train / test drawn from disjoint random episodes)."""
    from tpru_agent.finetune.data.tpru_format import TPRURow, encode_png, write_parquet
    from tpru_agent.tasks import ordering

    question = ordering.build(frames)
    labels = question.labels

    def rows(n: int, split_seed: int, tag: str) -> list:
        rng = random.Random(split_seed)
        out = []
        for i in range(n):
            images = episode_frames(rng, frames)
            order = list(range(frames))
            rng.shuffle(order)
            answer = "".join(labels[order.index(t)] for t in range(frames))
            out.append(TPRURow(question.problem, tuple(encode_png(images[t]) for t in order), answer,
                               task="ordering", domain="synthetic", episode_id=f"{tag}-{i}"))
        return out

    write_parquet(rows(n_train, seed, "train"), root / "train" / "part-0.parquet")
    write_parquet(rows(n_test, seed + 10_000, "test"), root / "test" / "part-0.parquet")
    (root / "manifest.json").write_text(json.dumps({"task": f"growing bar, {frames} frames", "seed": seed,
                                                    "train": n_train, "test": n_test}))
    return root


def curve(metrics_path: Path) -> list[dict]:
    """Held-out accuracy records in step order, per stage."""
    out = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "eval_accuracy" in record:
            out.append({"stage": record["stage"], "step": record["step"], "accuracy": record["eval_accuracy"],
                        "format": record.get("eval_format")})
    return out


def learn(workdir: Path, *, size: str = "tiny", frames: int = 3, n_train: int = 2000, n_test: int = 100,
          sft_steps: int = 150, grpo_steps: int = 200, eval_steps: int = 50, sft_lr: float = 1e-3,
          grpo_lr: float = 5e-5, reward: str = "tpru_partial", pixels: int = FRAME_PIXELS, max_completion: int = 64,
          seed: int = 0) -> dict:
    """Run the experiment in ``workdir``; returns the figures."""
    from tpru_agent.finetune.train.config import resolve_config
    from tpru_agent.finetune.train.job import train
    from tpru_agent.testing import build_tiny_checkpoint

    workdir.mkdir(parents=True, exist_ok=True)
    model = build_tiny_checkpoint(workdir / f"model-{size}", size=size, seed=seed)
    data = workdir / f"data-{frames}f-{n_train}-{seed}"
    if not (data / "manifest.json").is_file():
        write_task(data, frames=frames, n_train=n_train, n_test=n_test, seed=seed)
    out = workdir / f"run-{int(time.time())}"
    cfg = resolve_config(overrides=dict(
        base=str(model), data=str(data), output_dir=str(out), method="sft+grpo", device="cpu", progress=False,
        sft_max_steps=sft_steps, sft_learning_rate=sft_lr, sft_batch_size=8, max_steps=grpo_steps,
        learning_rate=grpo_lr, beta=0.0, num_generations=4, per_device_train_batch_size=8, prompts_per_rollout=2,
        prompts_per_update=2, max_completion_length=max_completion, temperature=1.0, top_p=0.99, rewards=[reward],
        eval_steps=eval_steps, eval_samples=n_test, eval_max_new_tokens=max_completion,
        save_steps=max(sft_steps, grpo_steps),
        min_pixels=pixels, max_pixels=pixels, seed=seed, data_cache_dir=str(workdir / "datasets-cache")))
    started = time.perf_counter()
    result = train(cfg)
    points = curve(out / "metrics.jsonl")
    chance = 1 / math.factorial(frames)
    accs = [p["accuracy"] for p in points]
    final = result.evaluation or {}
    return {
        "frames": frames, "chance": round(chance, 4), "train_items": n_train, "test_items": n_test,
        "sft_steps": result.steps.get("sft"), "grpo_steps": result.steps.get("grpo"),
        "first_accuracy": accs[0] if accs else None, "best_accuracy": max(accs) if accs else None,
        "final_accuracy": final.get("accuracy"),
        "final_accuracy_ci": [round(x, 3) for x in final.get("accuracy_ci", [])],
        "final_format": final.get("format"),
        "final_vs_chance_x": round(final["accuracy"] / chance, 2) if final else None,
        "curve": " ".join(f"{p['stage']}@{p['step']}:{p['accuracy']:.2f}" for p in points),
        "wall_s": round(time.perf_counter() - started, 1), "run_dir": str(out),
    }


def run(args) -> dict:
    """Suite entry point (``python -m benchmarks learning``): tiny model unless --size is given."""
    import tempfile

    if not getattr(args, "quick", False) and "learning" not in (getattr(args, "names", None) or []):
        return {"skipped": "a training run of minutes: ask for it by name (python -m benchmarks learning)"}
    size = args.size if getattr(args, "size_given", False) else "tiny"
    if size not in ("tiny", "mid"):
        return {"skipped": f"learning runs on the offline tiny / mid models, not {size!r}"}
    root = Path(args.workdir) if getattr(args, "workdir", None) else Path(tempfile.gettempdir()) / "tpru-learning"
    if getattr(args, "quick", False):
        return learn(root, size=size, n_train=64, n_test=8, sft_steps=4, grpo_steps=2, eval_steps=2)
    return learn(root, size=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/tpru-learning")
    parser.add_argument("--size", default="tiny", choices=["tiny", "mid"])
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--grpo-steps", type=int, default=200)
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--grpo-lr", type=float, default=5e-5)
    parser.add_argument("--reward", default="tpru_partial")
    parser.add_argument("--pixels", type=int, default=FRAME_PIXELS)
    parser.add_argument("--max-completion", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    a = parser.parse_args()
    figures = learn(Path(a.workdir), size=a.size, frames=a.frames, n_train=a.train, n_test=a.test,
                    sft_steps=a.sft_steps, grpo_steps=a.grpo_steps, eval_steps=a.eval_steps, sft_lr=a.sft_lr,
                    grpo_lr=a.grpo_lr, reward=a.reward, pixels=a.pixels, max_completion=a.max_completion,
                    seed=a.seed)
    text = json.dumps(figures, indent=2)
    if a.json:
        Path(a.json).write_text(text)
    print(text)  # a command-line script's output (the suite runner records run() results itself)


if __name__ == "__main__":
    main()
