"""Episodes from video files: one video, one episode; frames sampled evenly or at scene changes.

Near-duplicate frames (a paused or static stretch) are dropped so that no two kept frames look the same, which
would make an ordering question unanswerable. A sidecar ``clip.json`` next to ``clip.mp4`` may set
``description`` / ``domain`` / ``task``; a ``clip.txt`` sets the description (first line).

Example:
    >>> from tpru_agent.finetune.sources.video import video_episodes
    >>> for ep in video_episodes("clips/", mode="scenes", frames=12):   # doctest: +SKIP
    ...     print(ep.episode_id, len(ep))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tpru_agent.errors import ConfigError, FrameError
from tpru_agent.finetune.data.features import (
    NEAR_DUP_MAX_DIFF,
    dedup_consecutive,
    fit_budget,
    frame_features,
    thumbs_array,
)
from tpru_agent.finetune.sources.base import Episode
from tpru_agent.finetune.sources.common import (
    SkipFn,
    check_count,
    even_indices,
    natural_key,
    read_meta,
    skip,
    text_name,
)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
MODES = ("even", "scenes")


def list_videos(path: str | Path) -> list[Path]:
    """The video files a source names: one file, or the videos in a folder (natural order).

    Raises:
        ConfigError: nothing there, or no videos in the folder.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"video source {str(path)!r} does not exist; pass a video file or a folder of videos")
    videos = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS),
                    key=lambda p: natural_key(p.name))
    if not videos:
        raise ConfigError(f"video source {str(path)!r} holds no {'/'.join(sorted(VIDEO_EXTENSIONS))} files")
    return videos


def _sidecar(video: Path) -> dict:
    meta = read_meta(video.with_suffix(".json"))
    text = video.with_suffix(".txt")
    if "description" not in meta and text.is_file():
        first = text.read_text(encoding="utf-8").strip().splitlines()
        if first:
            meta["description"] = first[0].strip()
    return meta


def scene_indices(thumbs: np.ndarray, wanted: int) -> list[int]:
    """One frame per scene: cut at the ``wanted - 1`` largest visual changes, keep each segment's middle frame."""
    n = len(thumbs)
    if n <= wanted:
        return list(range(n))
    change = np.abs(np.diff(thumbs.astype(np.float32), axis=0)).mean(axis=1)  # change[i]: frame i -> i + 1
    cuts = sorted(int(i) + 1 for i in np.argsort(-change, kind="stable")[: wanted - 1])
    bounds = [0, *cuts, n]
    return [(bounds[k] + bounds[k + 1] - 1) // 2 for k in range(len(bounds) - 1)]


def sample_frames(frames: list, wanted: int, *, mode: str = "even", near_dup: int = NEAR_DUP_MAX_DIFF) -> list[int]:
    """Indices of ``frames`` to keep: ``wanted`` of them, no two consecutive ones near-duplicates."""
    if mode not in MODES:
        raise ConfigError(f"video mode must be one of {MODES}, got {mode!r}")
    thumbs = thumbs_array([frame_features(f).thumb for f in frames])
    if mode == "scenes":
        picked = scene_indices(thumbs, wanted)
        return [picked[i] for i in dedup_consecutive(thumbs[picked], near_dup)]
    kept = dedup_consecutive(thumbs, near_dup)
    return [kept[i] for i in even_indices(len(kept), wanted)]


def video_episodes(paths: str | Path | Sequence[str | Path], *, frames: int = 16, mode: str = "even",
                   oversample: int = 3, domain: str | None = None, description: str | None = None,
                   task: str | None = None, min_frames: int = 4, near_dup: int = NEAR_DUP_MAX_DIFF,
                   on_skip: SkipFn | None = None) -> Iterator[Episode]:
    """Yield one :class:`Episode` per video, frames resized to the TPRU pixel budget.

    Args:
        paths: a video, a folder of videos, or a list of either.
        frames: frames to keep per video.
        mode: ``"even"`` (spread over the whole video) or ``"scenes"`` (the middle frame of each segment between
            the ``frames - 1`` largest visual changes).
        oversample: candidates read per kept frame (``frames * oversample`` frames are decoded, evenly spaced) so
            that dropping near-duplicates still leaves enough.
        domain / description / task: used when no sidecar sets them (domain default ``"video"``).
        min_frames: videos that keep fewer distinct frames are skipped (reported through ``on_skip``).
        near_dup: near-duplicate threshold (largest 32x32 thumbnail pixel difference, 0-255).
        on_skip: told ``(episode_id, reason)`` for each video dropped.

    Raises:
        ConfigError: a path is missing, or an option is out of range.
    """
    from tpru_agent.video import read_video

    check_count("frames", frames)
    check_count("oversample", oversample)
    check_count("min_frames", min_frames)
    if mode not in MODES:
        raise ConfigError(f"video mode must be one of {MODES}, got {mode!r}")
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    videos = [v for item in items for v in list_videos(item)]
    for video in videos:
        episode_id = text_name(f"{video.parent.name}/{video.stem}")   # the same however the videos are chunked into units
        meta = _sidecar(video)
        try:
            raw = read_video(video, video_frames=frames * oversample)
            candidates = [fit_budget(f) for f in raw]
        except FrameError as exc:
            skip(on_skip, episode_id, f"unreadable video: {exc}")
            continue
        del raw
        keep = sample_frames(candidates, frames, mode=mode, near_dup=near_dup)
        if len(keep) < min_frames:
            skip(on_skip, episode_id, f"too few distinct frames: {len(keep)} after dropping near-duplicates, "
                                      f"need {min_frames}")
            continue
        text = meta.get("description") or description or ""
        yield Episode(
            episode_id=episode_id, frames=tuple(candidates[i] for i in keep), description=text,
            domain=meta.get("domain") or domain or "video", task=meta.get("task") or task or text,
            meta={"source": "video", "path": text_name(video), "mode": mode, "candidates": len(candidates)},
        )
