"""Episodes from a LeRobot dataset on local disk, both layouts in use, one camera; the task string is the description.

- v2.1: ``meta/info.json``, ``meta/episodes.jsonl`` (``episode_index``, ``tasks``, ``length``),
  ``meta/tasks.jsonl``, ``data/chunk-XXX/episode_XXXXXX.parquet``, videos at ``info["video_path"]``
  (``videos/chunk-XXX/{video_key}/episode_XXXXXX.mp4``).
- v3.0: ``meta/info.json``, ``meta/episodes/chunk-XXX/file-XXX.parquet`` (one row per episode with its data and
  video file indices and ``videos/{key}/from_timestamp`` / ``to_timestamp``), ``meta/tasks.parquet``, many
  episodes per data / video file.

Cameras stored as video (``dtype: video``) and as images inside the data parquet (``dtype: image``) both work.

Example:
    >>> from tpru_agent.finetune.sources.lerobot import lerobot_episodes
    >>> eps = lerobot_episodes("~/data/aloha_cups", camera="observation.images.top", frames=16)   # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from tpru_agent.errors import ConfigError, FrameError, close_matches, require
from tpru_agent.finetune.data.features import fit_budget
from tpru_agent.finetune.sources.base import Episode
from tpru_agent.finetune.sources.common import SkipFn, check_count, even_indices, skip


class LeRobotLayout:
    """Where a local LeRobot dataset keeps its episodes, frames and tasks (v2.x or v3.x).

    Raises:
        ConfigError: the folder is not a LeRobot dataset, its version is unsupported, or a meta file lacks a key.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise ConfigError(f"lerobot source {str(self.root)!r} has no meta/info.json; pass the dataset's root "
                              "folder (the one holding meta/, data/ and videos/)")
        try:
            self.info = json.loads(info_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"{str(info_path)!r} is not valid JSON ({exc})") from exc
        self.version = str(self._key(self.info, "codebase_version", info_path))
        self.major = self.version.lstrip("v").split(".")[0]
        if self.major not in ("2", "3"):
            raise ConfigError(f"{str(self.root)!r} is LeRobot {self.version}; versions v2.x and v3.x are supported "
                              "(convert older datasets with lerobot's conversion scripts)")
        self.fps = float(self._key(self.info, "fps", info_path))
        features = self._key(self.info, "features", info_path)
        self.cameras = {k: v.get("dtype") for k, v in features.items()
                        if isinstance(v, dict) and v.get("dtype") in ("video", "image")}
        self.episodes = self._load_episodes()

    def _key(self, data: dict, key: str, where):
        if key not in data:
            raise ConfigError(f"{str(where)!r} lacks the key {key!r}; the LeRobot metadata is incomplete")
        return data[key]

    def camera(self, wanted: str | None) -> str:
        """The camera key to read: ``wanted``, or the first camera in ``meta/info.json``."""
        if not self.cameras:
            raise ConfigError(f"{str(self.root)!r} has no camera features (dtype video or image) in meta/info.json")
        if wanted is None:
            return next(iter(self.cameras))
        if wanted not in self.cameras:
            raise ConfigError(f"camera {wanted!r} is not in {str(self.root)!r}; cameras: {sorted(self.cameras)}."
                              + close_matches(wanted, self.cameras))
        return wanted

    def _load_episodes(self) -> dict[int, dict]:
        return self._episodes_v2() if self.major == "2" else self._episodes_v3()

    def _episodes_v2(self) -> dict[int, dict]:
        path = self.root / "meta" / "episodes.jsonl"
        if not path.is_file():
            raise ConfigError(f"{str(self.root)!r} (LeRobot {self.version}) has no meta/episodes.jsonl")
        out = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                index = int(self._key(row, "episode_index", f"{path}:{n}"))
                out[index] = {"tasks": list(row.get("tasks") or []), "length": row.get("length")}
        return out

    def _episodes_v3(self) -> dict[int, dict]:
        pq = require("pyarrow.parquet", "finetune", what="reading LeRobot v3 datasets")
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise ConfigError(f"{str(self.root)!r} (LeRobot {self.version}) has no "
                              "meta/episodes/chunk-*/file-*.parquet")
        out = {}
        for file in files:
            names = pq.ParquetFile(file).schema_arrow.names
            columns = [c for c in names if not c.startswith("stats/")]
            table = pq.read_table(file, columns=columns).to_pylist()
            for row in table:
                index = int(self._key(row, "episode_index", file))
                out[index] = row
        return out

    def description(self, index: int) -> str:
        """The episode's task string (its first task when it has several)."""
        row = self.episodes[index]
        tasks = row.get("tasks") or []
        if isinstance(tasks, str):
            tasks = [tasks]
        return str(tasks[0]) if tasks else ""

    def video_file(self, index: int, camera: str) -> tuple[Path, float, float | None]:
        """The video holding ``camera`` for episode ``index``, and the episode's start / end time in it."""
        row = self.episodes[index]
        template = self.info.get("video_path")
        if not template:
            raise ConfigError(f"{str(self.root)!r}: meta/info.json lacks 'video_path' but {camera!r} is a video")
        if self.major == "2":
            chunk = index // int(self.info.get("chunks_size", 1000))
            rel = template.format(episode_chunk=chunk, video_key=camera, episode_index=index)
            return self.root / rel, 0.0, None
        prefix = f"videos/{camera}/"
        for key in ("chunk_index", "file_index", "from_timestamp"):
            if prefix + key not in row:
                raise ConfigError(f"{str(self.root)!r}: episode {index} in meta/episodes lacks {prefix + key!r}")
        rel = template.format(video_key=camera, chunk_index=int(row[prefix + "chunk_index"]),
                              file_index=int(row[prefix + "file_index"]))
        end = row.get(prefix + "to_timestamp")
        return self.root / rel, float(row[prefix + "from_timestamp"]), None if end is None else float(end)

    def data_file(self, index: int) -> Path:
        """The parquet file holding episode ``index``'s rows."""
        template = self._key(self.info, "data_path", self.root / "meta" / "info.json")
        if self.major == "2":
            chunk = index // int(self.info.get("chunks_size", 1000))
            return self.root / template.format(episode_chunk=chunk, episode_index=index)
        row = self.episodes[index]
        return self.root / template.format(chunk_index=int(row.get("data/chunk_index", 0)),
                                           file_index=int(row.get("data/file_index", 0)))


def _video_frames(path: Path, start: float, end: float | None, fps: float, frames: int) -> list:
    from tpru_agent.video import read_video

    if not path.is_file():
        raise FrameError("video file is missing", source=str(path))
    if start == 0.0 and end is None:
        return read_video(path, video_frames=frames)
    last = max(start, (end if end is not None else start) - 1.0 / fps)
    times = [start + (last - start) * k / max(frames - 1, 1) for k in range(frames)]
    return read_video(path, timestamps=sorted(set(round(t, 6) for t in times)))


def _image_frames(layout: LeRobotLayout, index: int, camera: str, frames: int) -> list:
    pq = require("pyarrow.parquet", "finetune", what="reading LeRobot datasets")
    from tpru_agent.frames import load_frame

    path = layout.data_file(index)
    if not path.is_file():
        raise FrameError("data file is missing", source=str(path))
    table = pq.read_table(path, columns=["episode_index", camera])
    cells = [c for e, c in zip(table.column("episode_index").to_pylist(), table.column(camera).to_pylist())
             if int(e) == index]
    picked = [cells[i] for i in even_indices(len(cells), frames)]
    return [load_frame(c["bytes"] if isinstance(c, dict) else c, budget=None, index=i) for i, c in enumerate(picked)]


def lerobot_episodes(root: str | Path, *, camera: str | None = None, episodes: Sequence[int] | None = None,
                     frames: int = 16, domain: str = "robot", min_frames: int = 4,
                     on_skip: SkipFn | None = None) -> Iterator[Episode]:
    """Yield one :class:`Episode` per LeRobot episode, ``frames`` frames of one camera at the TPRU pixel budget.

    Args:
        root: the dataset folder (holding ``meta/info.json``).
        camera: feature key of the camera, e.g. ``"observation.images.top"`` (default: the first one listed).
        episodes: episode indices to read (default: all in the episode metadata).
        frames: frames per episode, spread evenly from its first to its last frame.
        domain: domain of every episode.
        min_frames: episodes with fewer readable frames are skipped (reported through ``on_skip``).
        on_skip: told ``(episode_id, reason)`` for each episode dropped (missing file, unreadable video, too short).

    Raises:
        ConfigError: not a LeRobot dataset, unsupported version, unknown camera, missing meta key, unknown episode.
    """
    check_count("frames", frames)
    check_count("min_frames", min_frames)
    layout = LeRobotLayout(root)
    key = layout.camera(camera)
    wanted = sorted(layout.episodes) if episodes is None else [int(i) for i in episodes]
    unknown = [i for i in wanted if i not in layout.episodes]
    if unknown:
        raise ConfigError(f"episodes {unknown[:5]} are not in {str(layout.root)!r} "
                          f"({len(layout.episodes)} episodes, indices {min(layout.episodes)}..{max(layout.episodes)})")
    name = layout.root.name
    for index in wanted:
        episode_id = f"{name}/episode_{index:06d}"
        try:
            if layout.cameras[key] == "video":
                path, start, end = layout.video_file(index, key)
                raw = _video_frames(path, start, end, layout.fps, frames)
            else:
                raw = _image_frames(layout, index, key, frames)
            images = tuple(fit_budget(f) for f in raw)
        except FrameError as exc:
            skip(on_skip, episode_id, f"unreadable frames: {exc}")
            continue
        if len(images) < min_frames:
            skip(on_skip, episode_id, f"too few frames: {len(images)}, need {min_frames}")
            continue
        text = layout.description(index)
        yield Episode(
            episode_id=episode_id, frames=images, description=text, domain=domain, task=text,
            meta={"source": "lerobot", "path": str(layout.root), "version": layout.version, "camera": key,
                  "episode_index": index},
        )
