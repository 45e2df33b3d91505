"""Shared by the fine-tuning run tests (test_finetune.py, test_finetune_guards.py): a synthetic TPRU dataset of
growing bars, the smallest run config, and readers for weights and metrics."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

from tpru_agent.finetune.train.config import resolve_config

REPO = Path(__file__).resolve().parents[1]


def bar_frame(step: int, steps: int = 4, hue: int = 0, size: int = 112) -> Image.Image:
    """A bar that grows with time: frame ``step`` of a ``steps``-step procedure."""
    image = Image.new("RGB", (size, size), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    height = int(size * (step + 1) / (steps + 1))
    draw.rectangle([16, size - height, size - 16, size - 4], fill=(200, 60 + hue, 40 + 2 * step * 20))
    return image


def write_dataset(root: Path, *, n_train: int = 12, n_test: int = 4, seed: int = 0) -> Path:
    """A TPRU-layout dataset: 4- and 3-frame ordering and 7-image next-frame questions over growing bars."""
    from tpru_agent.finetune.data.tpru_format import TPRURow, encode_png, write_parquet
    from tpru_agent.tasks import next_frame, ordering

    rng = random.Random(seed)

    def rows(n: int, tag: str) -> list:
        out = []
        for i in range(n):
            kind = ("ordering4", "ordering3", "next")[i % 3]
            if kind.startswith("ordering"):
                k = int(kind[-1])
                order = list(range(k))
                rng.shuffle(order)
                frames = [bar_frame(t, k, hue=10 * i) for t in order]
                answer = "".join("ABCD"[order.index(t)] for t in range(k))
                q = ordering.build(k)
            else:
                q = next_frame.build(2, 4, with_goal=True, none_position=-1)
                candidates = [bar_frame(2, hue=10 * i), bar_frame(0, hue=90), bar_frame(3, hue=120),
                              bar_frame(1, hue=150)]
                rng.shuffle(candidates)
                truth = next(j for j, c in enumerate(candidates) if c.tobytes() == bar_frame(2, hue=10 * i).tobytes())
                frames = [bar_frame(0, hue=10 * i), bar_frame(1, hue=10 * i), bar_frame(3, hue=10 * i)] + candidates
                answer = "ABCD"[truth]
                kind = "next"
            out.append(TPRURow(q.problem, tuple(encode_png(f) for f in frames), answer,
                               task="ordering" if kind.startswith("ordering") else "next", domain="synthetic",
                               episode_id=f"{tag}-{i}"))
        return out

    write_parquet(rows(n_train, "train"), root / "train" / "part-0.parquet")
    write_parquet(rows(n_test, "test"), root / "test" / "part-0.parquet")
    (root / "manifest.json").write_text(json.dumps({"builder": "tests", "seed": seed}))
    return root


def tiny_config(tiny: Path, data: Path, out: Path, **overrides):
    """The smallest run that still exercises everything: 1 prompt x 4 rollouts per step, 16-token completions."""
    values = dict(base=str(tiny), data=str(data), output_dir=str(out), num_generations=4,
                  per_device_train_batch_size=4, prompts_per_rollout=1, prompts_per_update=1, max_completion_length=16,
                  max_steps=2, save_steps=1, learning_rate=1e-3, rewards=["tpru", "label_density"], eval_samples=2,
                  eval_max_new_tokens=8, device="cpu", progress=False, lora_r=4, lora_alpha=8, sft_batch_size=2,
                  data_cache_dir=str(out.parent / "datasets-cache"))
    values.update(overrides)
    return resolve_config(overrides=values)


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def changed_keys(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not bool((a[k] == b[k]).all())}


#: Saved checkpoints use the Hub key layout (``visual.*``, ``model.layers.*``); the in-memory one nests them.
VISION_KEY = re.compile(r"^(model\.)?visual\.")
LM_PROJECTION_KEY = re.compile(r"^model\.(language_model\.)?layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\."
                               r"(weight|bias)$")


def records(path: Path, key: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if key is None or key in r]


def answers(final: Path, frames) -> None:
    """The weights load in the SDK and answer an ordering question."""
    from tpru_agent import TPRU

    result = TPRU(final).order_frames(frames, mode="fast")
    assert sorted(result.order) == [0, 1, 2, 3]
    assert 0.0 < result.confidence <= 1.0 and result.engine == "hf"
