"""Read and write the TPRU data layout (TPRU-25k / TPRU-test): parquet rows of ``problem`` / ``images`` / ``answer``.

``problem`` holds one literal ``<image>`` per image; ``images`` is a list of ``{"bytes": PNG, "path": name}``
structs with the Hugging Face ``Image`` feature recorded in the schema metadata, so
``datasets.load_dataset("parquet", data_files=...)`` decodes them to PIL images; ``answer`` is ``"C"`` or
``"CABD"``. Files this project writes also carry ``task``, ``domain``, ``negative`` and ``episode_id``; files
without them (the authors' own) read with empty defaults.

Writes are deterministic (same rows -> same bytes) and atomic (:func:`tpru_agent.fsutil.atomic_path`).

Example:
    >>> from tpru_agent.finetune.data.tpru_format import TPRURow, write_parquet, read_parquet
    >>> write_parquet([TPRURow("Image A: <image>", (png,), "A")], "part-0.parquet")   # doctest: +SKIP
    >>> next(read_parquet("part-0.parquet")).answer                                      # doctest: +SKIP
    'A'
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tpru_agent.errors import ConfigError, FrameError, require
from tpru_agent.fsutil import atomic_path
from tpru_agent.tasks import IMAGE

log = logging.getLogger(__name__)

#: The manifest a build writes beside its splits (``OUT/manifest.json``), and the split folders it writes.
MANIFEST = "manifest.json"
SPLITS = ("train", "test")

#: Column order of the files this project writes.
COLUMNS = ("problem", "images", "answer", "task", "domain", "negative", "episode_id")
REQUIRED = ("problem", "images", "answer")
#: Hugging Face ``datasets`` features in the schema metadata. ``Sequence`` (not ``List``) so that datasets 3.x,
#: which the authors' files were written with, reads the files as well as 4.x / 5.x do.
HF_FEATURES = {
    "problem": {"dtype": "string", "_type": "Value"},
    "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
    "answer": {"dtype": "string", "_type": "Value"},
    "task": {"dtype": "string", "_type": "Value"},
    "domain": {"dtype": "string", "_type": "Value"},
    "negative": {"dtype": "bool", "_type": "Value"},
    "episode_id": {"dtype": "string", "_type": "Value"},
}


@dataclass(frozen=True)
class TPRURow:
    """One TPRU item.

    Attributes:
        problem: question text with one ``<image>`` per image (without the answer-rules preamble).
        images: encoded images (PNG bytes), in placeholder order.
        answer: ground truth: an option letter or a label permutation.
        task: ``ordering`` / ``ordering_mcq`` / ``next`` / ``previous`` ("" when unknown).
        domain: scenario family ("robot", "gui", ...; "" when unknown).
        negative: the answer is the "None" option because the text contradicts the images or the true frame is
            missing from the candidates.
        episode_id: the source episode (for splits and provenance).
        names: optional provenance name per image (stored as the struct's ``path``).
    """

    problem: str
    images: tuple[bytes, ...]
    answer: str
    task: str = ""
    domain: str = ""
    negative: bool = False
    episode_id: str = ""
    names: tuple[str | None, ...] = ()

    def check(self) -> None:
        """Raise :class:`ConfigError` when the placeholders and images disagree or the answer is empty."""
        placeholders = self.problem.count(IMAGE)
        if placeholders != len(self.images):
            raise ConfigError(f"row of episode {self.episode_id!r}: the problem has {placeholders} {IMAGE} "
                              f"placeholders but {len(self.images)} images are attached; they must match one to one")
        if not self.answer:
            raise ConfigError(f"row of episode {self.episode_id!r} has an empty answer")

    def decoded(self) -> list:
        """The images as RGB PIL images."""
        return [decode_image(data, source=f"{self.episode_id or 'row'} image {i}")
                for i, data in enumerate(self.images)]


def encode_png(image) -> bytes:
    """PNG bytes of an RGB PIL image (deterministic: same pixels, same bytes).

    OpenCV's libpng with the run-length strategy: as small as Pillow's default PNG on camera frames and GUI
    screenshots, and 2-7x faster (encoding dominated the build's time).
    """
    import cv2
    import numpy as np

    array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(array[:, :, ::-1]),
                            [cv2.IMWRITE_PNG_COMPRESSION, 6, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:  # pragma: no cover - libpng refuses only empty images
        raise FrameError(f"PNG encoding failed for a {image.size[0]}x{image.size[1]} image")
    return data.tobytes()


def decode_image(data: bytes, *, source: str = "image"):
    """PIL RGB image from encoded bytes; :class:`FrameError` when they are not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise FrameError(f"stored image is not readable ({exc}); rebuild or re-download the file",
                         source=source) from exc
    return image.convert("RGB")


def _schema():
    pa = require("pyarrow", "finetune", what="the TPRU parquet format")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("problem", pa.string()), ("images", pa.list_(image)), ("answer", pa.string()),
              ("task", pa.string()), ("domain", pa.string()), ("negative", pa.bool_()),
              ("episode_id", pa.string())]
    metadata = {b"huggingface": json.dumps({"info": {"features": HF_FEATURES}}).encode()}
    return pa.schema(fields, metadata=metadata)


def write_parquet(rows: Iterable[TPRURow], path: str | Path) -> int:
    """Write rows to one parquet file atomically; returns the number of rows.

    Raises:
        ConfigError: a row's placeholders and images disagree.
    """
    pa = require("pyarrow", "finetune", what="the TPRU parquet format")
    pq = require("pyarrow.parquet", "finetune", what="the TPRU parquet format")
    rows = list(rows)
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for row in rows:
        row.check()
        names = row.names or (None,) * len(row.images)
        columns["problem"].append(row.problem)
        columns["images"].append([{"bytes": data, "path": name} for data, name in zip(row.images, names)])
        columns["answer"].append(row.answer)
        columns["task"].append(row.task)
        columns["domain"].append(row.domain)
        columns["negative"].append(bool(row.negative))
        columns["episode_id"].append(row.episode_id)
    table = pa.Table.from_pydict(columns, schema=_schema())
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=64)
    return len(rows)


def intact(path: Path, *, rows: int | None = None) -> bool:
    """A complete parquet file: non-empty, with a readable footer (and ``rows`` rows when given).

    A build trusts no file for its name alone: a 0-byte or torn file is redone, not shipped.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return False
    pq = require("pyarrow.parquet", "finetune", what="the TPRU parquet format")
    try:
        meta = pq.read_metadata(path)
    except Exception:  # noqa: BLE001 - any failure to read the footer means the file must be written again
        return False
    return rows is None or meta.num_rows == rows


def parquet_files(path: str | Path) -> list[Path]:
    """The parquet files under ``path`` (a file, or a folder searched recursively), sorted.

    Raises:
        ConfigError: nothing to read there.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"{str(p)!r} does not exist; pass a TPRU parquet file or a folder of them")
    # hidden names (a build's .work cache, temporary files) are not part of the dataset
    files = sorted(f for f in p.rglob("*.parquet")
                   if not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise ConfigError(f"{str(p)!r} holds no .parquet files; pass a folder built by `tpru data build` or the "
                          "TPRU-25k / TPRU-test files")
    return files


def cell_bytes(cell, root: Path | None, source: str, *, required: bool = True) -> bytes | None:
    """Encoded bytes of one ``images`` cell: raw bytes, or an HF-datasets ``{"bytes", "path"}`` struct.

    A relative ``path`` is read under ``root``. Anything else raises :class:`FrameError` when ``required``, else
    gives ``None`` (the caller may accept other cell types, e.g. PIL images).
    """
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        if cell.get("path"):
            image_path = Path(cell["path"])
            image_path = image_path if image_path.is_absolute() or root is None else root / image_path
            if image_path.is_file():
                return image_path.read_bytes()
            raise FrameError(f"image {cell['path']!r} has no bytes and the file is missing", source=source)
    if not required:
        return None
    raise FrameError(f"image cell of type {type(cell).__name__} is neither bytes nor a {{bytes, path}} struct",
                     source=source)


def read_parquet(path: str | Path, *, columns_only: bool = False) -> Iterator[TPRURow]:
    """Iterate the rows of one TPRU parquet file or of every parquet file under a folder.

    Args:
        path: a file or a folder.
        columns_only: skip the images (faster stats); ``images`` is then empty and ``names`` keeps the count as
            ``None`` entries.

    Raises:
        ConfigError: a file lacks ``problem`` / ``images`` / ``answer``.
    """
    pq = require("pyarrow.parquet", "finetune", what="the TPRU parquet format")
    for file in parquet_files(path):
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise ConfigError(f"{str(file)!r} is not in the TPRU layout: missing column(s) {missing} "
                              f"(has {names[:8]})")
        wanted = [c for c in COLUMNS if c in names and not (columns_only and c == "images")]
        for batch in parquet.iter_batches(batch_size=64, columns=wanted):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                yield _row(data, i, file, columns_only)


def _row(data: dict, i: int, file: Path, columns_only: bool) -> TPRURow:
    source = f"{file.name} row {i}"
    if columns_only:
        images: tuple = ()
        names: tuple = (None,) * data["problem"][i].count(IMAGE)
    else:
        cells = data["images"][i] or []
        images = tuple(cell_bytes(c, file.parent, source) for c in cells)
        names = tuple(c.get("path") if isinstance(c, dict) else None for c in cells)
    return TPRURow(
        problem=data["problem"][i], images=images, answer=str(data["answer"][i]).strip(),
        task=data.get("task", [""] * (i + 1))[i] or "", domain=data.get("domain", [""] * (i + 1))[i] or "",
        negative=bool(data.get("negative", [False] * (i + 1))[i]),
        episode_id=data.get("episode_id", [""] * (i + 1))[i] or "", names=names,
    )


def content_hash(files: Iterable[str | Path], root: str | Path) -> str:
    """SHA-256 over the relative paths and bytes of ``files`` (sorted): equal hash, equal dataset."""
    root = Path(root)
    digest = hashlib.sha256()
    for file in sorted(Path(f) for f in files):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _split_name(file: Path, root: Path) -> str:
    rel = file.relative_to(root).parts if root.is_dir() else ()
    return rel[0] if len(rel) > 1 else "all"


def summarize(path: str | Path) -> dict:
    """Counts per split (sub-folder; ``"all"`` for flat layouts): rows, tasks, domains, answer letters, negatives.

    Reads no images, so it is quick on large datasets.
    """
    from collections import Counter

    root = Path(path).expanduser()
    out: dict[str, dict] = {}
    for file in parquet_files(root):
        split = out.setdefault(_split_name(file, root), {"rows": 0, "images": 0, "tasks": Counter(),
                                                         "domains": Counter(), "answer_letters": Counter(),
                                                         "negatives": 0})
        for row in read_parquet(file, columns_only=True):
            split["rows"] += 1
            split["images"] += len(row.names)
            split["tasks"][row.task or "?"] += 1
            split["domains"][row.domain or "?"] += 1
            if len(row.answer) == 1:
                split["answer_letters"][row.answer] += 1
            split["negatives"] += bool(row.negative)
    for split in out.values():
        for key in ("tasks", "domains", "answer_letters"):
            split[key] = dict(sorted(split[key].items()))
        split["images_per_row"] = round(split["images"] / split["rows"], 2) if split["rows"] else 0.0
    return out


def sample_rows(path: str | Path, count: int, *, seed: int = 0) -> list[tuple[str, TPRURow]]:
    """``count`` rows drawn at random (reproducible for a seed) with their split names."""
    import random

    pq = require("pyarrow.parquet", "finetune", what="the TPRU parquet format")
    root = Path(path).expanduser()
    files = parquet_files(root)
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    total = sum(sizes)
    picked = sorted(random.Random(seed).sample(range(total), min(count, total)))
    out, offset = [], 0
    for file, size in zip(files, sizes):
        wanted = [i - offset for i in picked if offset <= i < offset + size]
        if wanted:
            rows = list(read_parquet(file))
            out.extend((_split_name(file, root), rows[i]) for i in wanted)
        offset += size
    return out


def budget_record(budget=None) -> dict:
    """The manifest's ``frames_budget``: the pixel budget a build stores frames at (TPRU's, as ``fit_budget``)."""
    from tpru_agent.sizing import TPRU_BUDGET

    return (budget or TPRU_BUDGET).to_dict()


def stored_budget(path: str | Path):
    """The pixel budget a dataset's frames were stored at, or ``None`` when they are not known to be sized.

    Read from the build manifest (``manifest.json``) of the build ``path`` is, or is a split folder of, or a
    parquet file in one of its split folders; a manifest further up belongs to something else. Builds made before
    the manifest recorded it sized frames at TPRU's budget (the builder never sized them otherwise), so a ``tpru
    data build`` manifest without the key means that budget. Frames at a served size are not always a fixed point
    of the resize (252x168 would be served at 224x168), so training and evaluation at the same budget use them as
    stored instead of sizing them again (each frame still checked by :func:`looks_served`).
    """
    from tpru_agent.sizing import TPRU_BUDGET, PixelBudget

    here = Path(path).expanduser().resolve()
    if here.is_file():
        here = here.parent
    root = here.parent if here.name in SPLITS and not (here / MANIFEST).is_file() else here
    file = root / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s cannot be read (%s): its frames are sized like any others", file, exc)
        return None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("tpru-data/"):
        return None
    record = manifest.get("frames_budget")
    if record is None:
        return TPRU_BUDGET
    try:
        return PixelBudget.from_dict(record)
    except ConfigError as exc:
        log.warning("%s: frames_budget %r is not a pixel budget (%s): its frames are sized like any others", file,
                    record, exc)
        return None


def looks_served(size: tuple[int, int], budget) -> bool:
    """Whether a frame of ``size`` can be one sized at ``budget`` (sides multiples of its factor, area within what
    the rounding allows): a frame used as stored must be one, or it is sized like any other."""
    width, height = size
    area = width * height
    return (width % budget.factor == 0 and height % budget.factor == 0
            and budget.min_pixels * 0.5 <= area <= budget.max_pixels * 1.5)
