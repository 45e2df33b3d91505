"""``tpru label``: per-frame progress labels for every episode of a dataset, as one parquet file.

The episodes come from the sources of ``tpru data build`` (frames, video, LeRobot v2.1 / v3.0, simulators). Each
episode's frames go through ``TPRU.progress`` in time order; one row per frame is written:

====================  ==========================================================================================
``episode_id``        the source's episode id (LeRobot: ``<dataset>/episode_000007``)
``episode_index``     LeRobot episode index (null for other sources)
``frame``             position of the frame among the episode's labelled frames (0..K-1)
``frame_index``       LeRobot: the dataset's ``frame_index`` of that frame (K frames spread evenly over the
                      episode); Meta-World: the simulator step; else ``frame``
``timestamp``         LeRobot: ``frame_index / fps`` in seconds (null for other sources)
``progress``          value in [0, 1] (0 = start, 1 = done) and ``confidence`` (per frame, see ``ProgressResult``)
``direction_known``   False when the engine guessed the direction (classic engine: taken from the time order)
====================  ==========================================================================================

plus ``task``, ``domain`` and ``source``. Durable and resumable: each finished episode's rows are appended to
``<out>.work/episodes.jsonl`` (flush + fsync; a torn last line from a kill is dropped on restart), a rerun skips the
episodes already there, and the parquet is written at the end through :func:`tpru_agent.fsutil.atomic_path`.
With ``concurrency > 1`` (openai engine) episodes are labelled in parallel threads against the server: the
distributed engine is the server (vLLM or ``tpru serve``), not this process.

Example:
    >>> from tpru_agent.finetune.eval.label import LabelConfig, run_label
    >>> config = LabelConfig(sources=("lerobot:~/data/aloha",), out="progress.parquet", model="classic")
    >>> run_label(config)["rows"]                                                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tpru_agent.errors import ConfigError, FrameError, ParseError, require
from tpru_agent.finetune.eval.run import ItemLog, check_resume, with_effective_mode
from tpru_agent.finetune.eval.voc import episodes
from tpru_agent.finetune.sources.base import Episode
from tpru_agent.finetune.sources.registry import parse_spec
from tpru_agent.fsutil import atomic_path, write_json
from tpru_agent.progress import METHODS

log = logging.getLogger(__name__)

COLUMNS = ("episode_id", "episode_index", "frame", "frame_index", "timestamp", "progress", "confidence",
           "direction_known", "task", "domain", "source")
#: Settings that must match for a rerun to resume into the same work folder.
RESUME_KEYS = ("model", "engine", "mode", "method", "sources", "seed", "template")


@dataclass
class LabelConfig:
    """What to label, with which model, and where the parquet goes.

    Attributes:
        sources: ``KIND:ARGS`` episode sources (as ``tpru data build --source``).
        out: the parquet file to write.
        model: name, Hub id, local folder, ONNX export, ``"classic"``, or the served model's name (openai).
        engine: ``auto`` / ``hf`` / ``onnx`` / ``openai`` / ``classic``.
        base_url: openai engine: the server, e.g. ``http://gpu-box:8000/v1`` (vLLM or ``tpru serve``).
        concurrency: episodes in flight at once (more than 1 needs the openai engine).
        mode, method: as for ``TPRU.progress``.
        seed: seed of the simulator sources' episodes.
    """

    sources: tuple[str, ...] = ()
    out: str = "progress.parquet"
    model: str = "classic"
    engine: str = "auto"
    base_url: str | None = None
    api_key: str | None = None
    concurrency: int = 1
    mode: str = "fast"
    method: str = "auto"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None
    template: str | None = None

    def check(self) -> None:
        """Raise :class:`ConfigError` for values that cannot work."""
        if not self.sources:
            raise ConfigError("no episode source given: pass -s KIND:ARGS, e.g. -s lerobot:~/data/aloha,frames=32")
        for text in self.sources:
            parse_spec(text)
        if not str(self.out).endswith(".parquet"):
            raise ConfigError(f"out must be a .parquet file, got {self.out!r}")
        if self.method not in METHODS or self.method in ("reference", "anchored"):
            raise ConfigError(f"method must be auto, rank or seriation for labelling, got {self.method!r}")
        if self.mode not in ("fast", "reason"):
            raise ConfigError(f"mode must be 'fast' or 'reason', got {self.mode!r}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.concurrency > 1 and self.engine != "openai":
            raise ConfigError(f"concurrency {self.concurrency} fans out over a server: pass --engine openai "
                              "--base-url URL (a vLLM or `tpru serve` deployment), or --concurrency 1")

    def work_dir(self) -> Path:
        """``<out>.work``: the run settings and the per-episode journal."""
        return Path(f"{self.out}.work")


def open_model(config: LabelConfig):
    """Build the :class:`~tpru_agent.TPRU` the config names."""
    from tpru_agent import TPRU

    kwargs = {"base_url": config.base_url} if config.base_url else {}
    if config.api_key:
        kwargs["api_key"] = config.api_key
    return TPRU(config.model, engine=config.engine, quantization=config.quantization, device=config.device,
                dtype=config.dtype, template=config.template, **kwargs)


def _lerobot_positions(ep: Episode, count: int, cache: dict) -> tuple[list[int], list[float]] | None:
    """The dataset frame indices and timestamps of a LeRobot episode's ``count`` evenly spread frames."""
    if ep.meta.get("source") != "lerobot":
        return None
    from tpru_agent.finetune.sources.lerobot import LeRobotLayout

    path = ep.meta["path"]
    layout = cache.get(path) or cache.setdefault(path, LeRobotLayout(path))
    length = layout.episodes[ep.meta["episode_index"]].get("length")
    if not length:
        return None
    indices = [round(k * (int(length) - 1) / max(count - 1, 1)) for k in range(count)]
    fps = float(layout.fps or 0) or None
    return indices, [i / fps if fps else None for i in indices]


def episode_rows(ep: Episode, result, cache: dict) -> list[dict]:
    """One row per frame of a labelled episode."""
    count = len(result.values)
    positions = _lerobot_positions(ep, count, cache)
    steps = ep.meta.get("frame_steps")
    rows = []
    for k in range(count):
        frame_index, timestamp = k, None
        if positions is not None:
            frame_index, timestamp = positions[0][k], positions[1][k]
        elif isinstance(steps, list) and len(steps) == count:
            frame_index = int(steps[k])
        rows.append({"episode_id": ep.episode_id, "episode_index": ep.meta.get("episode_index"), "frame": k,
                     "frame_index": frame_index, "timestamp": timestamp, "progress": float(result.values[k]),
                     "confidence": float(result.frame_confidence[k]), "direction_known": result.direction_known,
                     "task": ep.task, "domain": ep.domain, "source": ep.meta.get("source", "")})
    return rows


Progress = Callable[[int, int, float], None]


def _label_one(tpru, item_id: str, ep: Episode, config: LabelConfig) -> tuple[str, Episode, object]:
    frames = list(ep.frames)
    if len(frames) > 64:
        raise ConfigError(f"episode {ep.episode_id} has {len(frames)} frames; progress takes at most 64: set the "
                          "source's frames=N (e.g. lerobot:DIR,frames=32)")
    return item_id, ep, tpru.progress(frames, description=ep.description or None, mode=config.mode,
                                      method=config.method)


def run_label(config: LabelConfig, *, model=None, progress: Progress | None = None, overwrite: bool = False) -> dict:
    """Label every episode, resuming from ``<out>.work``; returns a summary (rows, episodes, episodes/min).

    Raises:
        ConfigError: bad settings, or the work folder holds a run with other settings.
    """
    config.check()
    pq = require("pyarrow.parquet", "finetune", what="writing progress labels")
    work = config.work_dir()
    tpru = model if model is not None else open_model(config)
    config = with_effective_mode(config, tpru)
    settings = {**asdict(config), "engine": tpru.engine_name, "sources": list(config.sources)}
    settings.pop("api_key", None)
    check_resume(work, settings, overwrite, keys=RESUME_KEYS, journal="episodes.jsonl", outputs=("summary.json",),
                 what="a labelling run")
    journal = ItemLog(work / "episodes.jsonl")
    done_before, started, cache, skipped = len(journal.records), time.perf_counter(), {}, []
    new = 0

    def finish(future) -> None:
        nonlocal new
        try:
            item_id, ep, result = future.result()
        except (ConfigError, FrameError, ParseError) as exc:
            skipped.append(str(exc))
            log.warning("episode skipped: %s", exc)
            return
        journal.append({"id": item_id, "rows": episode_rows(ep, result, cache)})
        new += 1
        if progress:
            progress(done_before, new, time.perf_counter() - started)

    with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        pending: set = set()
        for item_id, ep in episodes(config.sources, config.seed):
            if item_id in journal.records:
                continue
            pending.add(pool.submit(_label_one, tpru, item_id, ep, config))
            if len(pending) >= 2 * config.concurrency:  # bounded: frames of at most 2N episodes in memory
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    finish(future)
        for future in pending:
            finish(future)
    wall = time.perf_counter() - started
    rows = [row for record in journal.records.values() for row in record["rows"]]
    _write_parquet(pq, rows, Path(config.out))
    summary = {"out": str(config.out), "rows": len(rows), "episodes": len(journal.records), "new_episodes": new,
               "resumed_episodes": done_before, "skipped": skipped[:20], "wall_s": wall,
               "episodes_per_min": 60 * new / wall if wall > 0 and new else None, "engine": tpru.engine_name,
               "concurrency": config.concurrency}
    write_json(work / "summary.json", summary, default=str)
    return summary


def _write_parquet(pq, rows: list[dict], path: Path) -> None:
    import pyarrow as pa

    schema = pa.schema([("episode_id", pa.string()), ("episode_index", pa.int64()), ("frame", pa.int32()),
                        ("frame_index", pa.int64()), ("timestamp", pa.float64()), ("progress", pa.float32()),
                        ("confidence", pa.float32()), ("direction_known", pa.bool_()), ("task", pa.string()),
                        ("domain", pa.string()), ("source", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)




__all__ = ["COLUMNS", "LabelConfig", "episode_rows", "run_label"]
