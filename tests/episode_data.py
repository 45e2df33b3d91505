"""Synthetic episodes whose pixels say where they come from: background colour = episode, bar length = frame index.

Used by the source and builder tests to check answers against ground truth decoded from the images themselves,
and to write small datasets in the layouts the sources read (frame folders, mp4 videos, LeRobot v2.1 / v3.0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = (160, 120)
BAR_H = 10


def palette(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``n`` background colours, pairwise far apart (no channel of any two within 40)."""
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int, int]] = []
    while len(out) < n:
        c = tuple(int(x) for x in rng.integers(30, 200, 3))
        if all(max(abs(a - b) for a, b in zip(c, o)) > 40 for o in out):
            out.append(c)
    return out


def frame(color, index: int, total: int, size=SIZE) -> Image.Image:
    """Episode colour background, a square that moves with time, a white bar of length (index + 1) / total."""
    w, h = size
    img = Image.new("RGB", size, tuple(color))
    draw = ImageDraw.Draw(img)
    x = 5 + int((w - 40) * index / max(total - 1, 1))
    draw.rectangle([x, 20, x + 28, 48], fill=tuple(255 - c for c in color))
    draw.rectangle([0, h - BAR_H, max(1, round(w * (index + 1) / total)) - 1, h - 1], fill=(255, 255, 255))
    return img


def decode(img: Image.Image, total: int) -> tuple[tuple[int, int, int], int]:
    """(background colour, frame index) of a frame made by :func:`frame` (after any resize or codec)."""
    a = np.asarray(img.convert("RGB")).astype(int)
    h, w, _ = a.shape
    color = tuple(int(v) for v in np.median(a[h // 2 + 4: h - round(h * BAR_H / SIZE[1]) - 4, :, :].reshape(-1, 3),
                                            axis=0))
    row = a[h - max(2, round(h * BAR_H / SIZE[1]) // 2), :, :]
    white = (row.min(axis=1) > 215).sum()
    return color, int(round(white / w * total)) - 1


def same_color(a, b, tol: int = 24) -> bool:
    return max(abs(x - y) for x, y in zip(a, b)) <= tol


def write_folders(root: Path, episodes: list[dict]) -> None:
    """``episodes``: dicts with name, color, frames and optional description / domain / task (-> meta.json),
    ``ext`` and ``size``."""
    for ep in episodes:
        folder = root / ep["name"]
        folder.mkdir(parents=True, exist_ok=True)
        meta = {k: ep[k] for k in ("description", "domain", "task") if k in ep}
        if meta:
            (folder / "meta.json").write_text(json.dumps(meta))
        for i in range(ep["frames"]):
            frame(ep["color"], i, ep["frames"], size=ep.get("size", SIZE)).save(folder / f"frame_{i}.{ep.get('ext', 'png')}",
                                                     **({"quality": 95} if ep.get("ext") == "jpg" else {}))


def write_video(path: Path, images: list[Image.Image], fps: float = 10.0) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = images[0].size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for img in images:
        writer.write(cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR))
    writer.release()


def _features(cameras: dict[str, str]) -> dict:
    feats = {key: {"dtype": dtype, "shape": [SIZE[1], SIZE[0], 3], "names": ["height", "width", "channel"]}
             for key, dtype in cameras.items()}
    feats["observation.state"] = {"dtype": "float32", "shape": [2], "names": None}
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        feats[key] = {"dtype": "float32" if key == "timestamp" else "int64", "shape": [1], "names": None}
    return feats


def _camera_frame(camera: str, color, i: int, n: int) -> Image.Image:
    """The wrist camera sees the inverted colours, so a test can tell which camera was read."""
    c = tuple(255 - v for v in color) if "wrist" in camera else color
    return frame(c, i, n)


def write_lerobot(root: Path, version: str, episodes: list[dict], cameras: dict[str, str], fps: float = 10.0) -> None:
    """A small LeRobot dataset. ``episodes``: dicts with color, frames, task. ``cameras``: key -> video | image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "meta").mkdir(parents=True, exist_ok=True)
    tasks = sorted({ep["task"] for ep in episodes})
    v3 = version.startswith("v3")
    info = {"codebase_version": version, "robot_type": "toy", "fps": fps, "total_episodes": len(episodes),
            "chunks_size": 1000, "features": _features(cameras),
            "data_path": ("data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet" if v3 else
                          "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"),
            "video_path": ("videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if v3 else
                           "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")}
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    rows, meta_rows, videos, cursor, offset = [], [], {k: [] for k in cameras}, 0.0, 0
    for e, ep in enumerate(episodes):
        n = ep["frames"]
        data = {"timestamp": [i / fps for i in range(n)], "frame_index": list(range(n)), "episode_index": [e] * n,
                "index": list(range(offset, offset + n)), "task_index": [tasks.index(ep["task"])] * n,
                "observation.state": [[0.0, float(i)] for i in range(n)]}
        for key, dtype in cameras.items():
            images = [_camera_frame(key, ep["color"], i, n) for i in range(n)]
            if dtype == "image":
                data[key] = [{"bytes": _png(img), "path": f"frame_{i:06d}.png"} for i, img in enumerate(images)]
            elif v3:
                videos[key].extend(images)
            else:
                write_video(root / info["video_path"].format(episode_chunk=0, video_key=key, episode_index=e), images,
                            fps)
        meta = {"episode_index": e, "tasks": [ep["task"]], "length": n}
        if v3:
            meta.update({"data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": offset,
                         "dataset_to_index": offset + n})
            for key, dtype in cameras.items():
                if dtype == "video":
                    meta.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                                 f"videos/{key}/from_timestamp": cursor,
                                 f"videos/{key}/to_timestamp": cursor + n / fps})
            rows.append(data)
        else:
            path = root / info["data_path"].format(episode_chunk=0, episode_index=e)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(data), path)
        meta_rows.append(meta)
        cursor += n / fps
        offset += n
    if v3:
        merged = {k: [v for r in rows for v in r[k]] for k in rows[0]}
        path = root / info["data_path"].format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(merged), path)
        for key, images in videos.items():
            if images:
                write_video(root / info["video_path"].format(video_key=key, chunk_index=0, file_index=0), images, fps)
        (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(meta_rows), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
        pq.write_table(pa.table({"task_index": list(range(len(tasks))), "task": tasks}),
                       root / "meta" / "tasks.parquet")
    else:
        (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta_rows))
        (root / "meta" / "tasks.jsonl").write_text(
            "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks)))


def _png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
