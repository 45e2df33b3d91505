"""Episode cache of a build: one parquet file per source unit, written atomically, read back lazily.

Each row is one episode: its ids and texts, its frames as PNG bytes at the TPRU pixel budget, and per frame a
content fingerprint and the small thumbnails of :mod:`.features`. The unit's skipped episodes (with reasons) live
in the file's schema metadata. A unit file that exists is complete, so a killed build resumes by running only the
units whose file is missing, and every later step reads the same bytes whichever run wrote them.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tpru_agent.errors import require
from tpru_agent.finetune.data.features import EMBED_SIDE, THUMB_LEN, fit_budget, frame_features
from tpru_agent.finetune.data.tpru_format import encode_png
from tpru_agent.finetune.sources.registry import Unit, run_unit
from tpru_agent.fsutil import atomic_path

LIGHT_COLUMNS = ["episode_id", "description", "domain", "task", "meta", "digests", "thumbs", "embeds"]


@dataclass
class EpisodeRecord:
    """What planning needs to know about one cached episode (no pixels beyond thumbnails).

    ``thumbs`` is (n, THUMB_LEN) uint8 and ``embeds`` (n, 768) uint8; ``gid`` is the episode's position in the
    build's deterministic order.
    """

    gid: int
    episode_id: str
    unit: str
    row: int
    source: int
    description: str
    domain: str
    task: str
    digests: tuple[str, ...]
    thumbs: np.ndarray = field(repr=False)
    embeds: np.ndarray = field(repr=False)
    meta: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.digests)


def _schema(skips: list, unit: Unit):
    pa = require("pyarrow", "finetune", what="building TPRU data")
    fields = [("episode_id", pa.string()), ("description", pa.string()), ("domain", pa.string()),
              ("task", pa.string()), ("meta", pa.string()), ("frames", pa.list_(pa.binary())),
              ("digests", pa.list_(pa.string())), ("thumbs", pa.list_(pa.binary())),
              ("embeds", pa.list_(pa.binary()))]
    meta = {b"tpru_skips": json.dumps(skips).encode(), b"tpru_unit": unit.key.encode()}
    return pa.schema(fields, metadata=meta)


def ingest_unit(unit: Unit, prefix: str, path: str) -> dict:
    """Run one unit's source, encode its episodes and write ``path`` atomically; returns a small summary.

    Episode ids become ``prefix:<source id>`` so that they are unique across the sources of a build.
    """
    pa = require("pyarrow", "finetune", what="building TPRU data")
    pq = require("pyarrow.parquet", "finetune", what="building TPRU data")
    from tpru_agent.images import fingerprint

    skips: list[list[str]] = []
    columns: dict[str, list] = {name: [] for name in
                                ("episode_id", "description", "domain", "task", "meta", "frames", "digests",
                                 "thumbs", "embeds")}
    for episode in run_unit(unit, on_skip=lambda eid, reason: skips.append([f"{prefix}:{eid}", reason])):
        images = [fit_budget(frame) for frame in episode.frames]
        feats = [frame_features(image) for image in images]
        columns["episode_id"].append(f"{prefix}:{episode.episode_id}")
        columns["description"].append(episode.description or "")
        columns["domain"].append(episode.domain or "custom")
        columns["task"].append(episode.task or episode.description or "")
        columns["meta"].append(json.dumps(episode.meta, sort_keys=True, default=str))
        columns["frames"].append([encode_png(image) for image in images])
        columns["digests"].append([fingerprint(image) for image in images])
        columns["thumbs"].append([f.thumb for f in feats])
        columns["embeds"].append([f.embed for f in feats])
    table = pa.Table.from_pydict(columns, schema=_schema(skips, unit))
    target = Path(path)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="none", row_group_size=1)   # one episode per row group
    return {"unit": unit.key, "episodes": len(columns["episode_id"]), "skips": len(skips)}


def read_unit(path: Path, unit: Unit, first_gid: int) -> tuple[list[EpisodeRecord], list[list[str]]]:
    """The light part of one unit file: its episode records and its skips."""
    pq = require("pyarrow.parquet", "finetune", what="building TPRU data")
    table = pq.read_table(path, columns=LIGHT_COLUMNS)
    skips = json.loads((table.schema.metadata or {}).get(b"tpru_skips", b"[]"))
    data = table.to_pydict()
    records = []
    for row in range(table.num_rows):
        thumbs = np.frombuffer(b"".join(data["thumbs"][row]), dtype=np.uint8).reshape(-1, THUMB_LEN)
        embeds = np.frombuffer(b"".join(data["embeds"][row]), dtype=np.uint8).reshape(-1, EMBED_SIDE ** 2 * 3)
        records.append(EpisodeRecord(
            gid=first_gid + row, episode_id=data["episode_id"][row], unit=unit.key, row=row, source=unit.source,
            description=data["description"][row], domain=data["domain"][row], task=data["task"][row],
            digests=tuple(data["digests"][row]), thumbs=thumbs, embeds=embeds, meta=json.loads(data["meta"][row]),
        ))
    return records, skips


class FrameStore:
    """PNG bytes of cached frames by (unit file, row, frame); reads one episode (one row group) at a time and keeps
    the most recent ``capacity`` episodes in memory."""

    def __init__(self, capacity: int = 96):
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, int], list] = OrderedDict()
        self._files: dict[str, object] = {}

    def get(self, path: str, row: int, frame: int) -> bytes:
        """The PNG bytes of one frame."""
        key = (path, row)
        frames = self._cache.get(key)
        if frames is None:
            parquet = self._files.get(path)
            if parquet is None:
                pq = require("pyarrow.parquet", "finetune", what="building TPRU data")
                parquet = self._files[path] = pq.ParquetFile(path)
            frames = parquet.read_row_group(row, columns=["frames"]).column("frames")[0].as_py()
            self._cache[key] = frames
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return frames[frame]
