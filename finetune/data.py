"""TPRU-layout datasets as TRL inputs: conversational multi-image prompts, images at the pixel budget.

A TPRU row (``problem`` with one ``<image>`` per image, ``images``, ``answer``) becomes what TRL's GRPO and SFT
trainers take for a vision-language model: a ``prompt`` with one user turn whose content interleaves
``{"type": "text"}`` parts and ``{"type": "image"}`` placeholders in the problem's order (TRL fills the
placeholders from ``images`` in order), the ``images`` resized to the TPRU budget, and the ``answer`` and
metadata columns the rewards read. The answer-rules preamble is added here (:func:`tpru_agent.tasks.render_prompt`),
the same function the SDK uses at inference, so training and serving prompts cannot drift.

Rows are converted on access (``datasets`` transform), so the images stay encoded on disk until a batch needs them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tpru_agent.errors import ConfigError, require
from tpru_agent.tasks import IMAGE, render_prompt

log = logging.getLogger(__name__)

#: Columns every converted example carries besides ``prompt`` / ``images``.
META_COLUMNS = ("answer", "task", "domain", "negative", "episode_id", "row_id")


def to_messages(problem: str, template: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One user turn: the rendered prompt split at each ``<image>`` into text parts and image placeholders.

    Example:
        >>> msgs = to_messages("A: <image> B: <image> Order them.")
        >>> [part["type"] for part in msgs[0]["content"]][:4]
        ['text', 'image', 'text', 'image']
    """
    text = render_prompt(problem, template)
    chunks = text.split(IMAGE)
    content: list[dict[str, Any]] = []
    for i, chunk in enumerate(chunks):
        if chunk:
            content.append({"type": "text", "text": chunk})
        if i < len(chunks) - 1:
            content.append({"type": "image"})
    return [{"role": "user", "content": content}]


def split_files(data: str | os.PathLike, split: str) -> list[Path]:
    """Parquet files of one split: ``DATA/SPLIT/*.parquet`` (or ``DATA`` itself when it is a file or flat folder).

    Raises:
        ConfigError: the folder or split does not exist or holds no parquet files.
    """
    from .tpru_format import parquet_files

    root = Path(data).expanduser()
    if not root.exists():
        raise ConfigError(f"data {str(root)!r} does not exist; pass a folder in the TPRU layout (train/*.parquet, "
                          "test/*.parquet), e.g. one built by `tpru data build`")
    if root.is_file():
        return [root]
    target = root / split
    if target.is_dir():
        return parquet_files(target)
    splits = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
    if splits:
        raise ConfigError(f"{str(root)!r} has no {split!r} split (it has {', '.join(splits)}); set train_split / "
                          "eval_split to one of them")
    return parquet_files(root)


def has_split(data: str | os.PathLike, split: str) -> bool:
    """True when ``DATA/SPLIT`` holds parquet files."""
    target = Path(data).expanduser() / split
    return target.is_dir() and any(target.rglob("*.parquet"))


def load_split(data: str | os.PathLike, split: str, *, template: str | None = None,
               min_pixels: int = 16384, max_pixels: int = 36864, limit: int | None = None,
               completion_fn: Callable[..., str] | None = None, cache_dir: str | None = None):
    """A ``datasets.Dataset`` of one split whose rows read as TRL multimodal examples.

    Each example: ``prompt`` (conversational, image placeholders), ``images`` (PIL, at the pixel budget),
    ``answer``, ``task``, ``domain``, ``negative``, ``episode_id`` and ``row_id`` (the row's index in the split,
    which the run logs to prove the data order on resume). With ``completion_fn(answer, task=, negative=)``, also
    ``completion``: the assistant turn supervised training targets. ``cache_dir``: where ``datasets`` keeps its
    memory-mapped copy (default: the Hugging Face datasets cache).

    Raises:
        ConfigError: missing split, rows whose placeholders and images disagree.
    """
    datasets = require("datasets", "finetune", what="fine-tuning")
    from tpru_agent.frames import PixelBudget, resize_to_budget

    files = [str(f) for f in split_files(data, split)]
    ds = datasets.Dataset.from_parquet(files, split="train", cache_dir=cache_dir)
    if "problem" not in ds.column_names or "images" not in ds.column_names or "answer" not in ds.column_names:
        raise ConfigError(f"{files[0]!r} is not in the TPRU layout: columns {ds.column_names}; need problem, "
                          "images, answer")
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    ds = ds.add_column("row_id", list(range(len(ds))))
    budget = PixelBudget(min_pixels=min_pixels, max_pixels=max_pixels)
    if template is not None:
        render_prompt("", template)  # fail now, not in the middle of a batch

    def transform(batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["problem"])
        out: dict[str, list] = {"prompt": [], "images": []}
        for i in range(n):
            problem, images = batch["problem"][i], list(batch["images"][i] or [])
            if problem.count(IMAGE) != len(images):
                raise ConfigError(f"row {batch['row_id'][i]} of split {split!r}: {problem.count(IMAGE)} {IMAGE} "
                                  f"placeholders but {len(images)} images; rebuild the dataset")
            out["prompt"].append(to_messages(problem, template))
            out["images"].append([resize_to_budget(img.convert("RGB"), budget) for img in images])
        for column in META_COLUMNS:
            default = False if column == "negative" else ""
            out[column] = batch.get(column, [default] * n)
        out["answer"] = [str(a).strip() for a in out["answer"]]
        if completion_fn is not None:
            out["completion"] = [
                [{"role": "assistant", "content": completion_fn(a, task=t or "", negative=bool(neg))}]
                for a, t, neg in zip(out["answer"], out["task"], out["negative"])
            ]
        return out

    return ds.with_transform(transform)


def manifest(data: str | os.PathLike) -> dict[str, Any]:
    """What the model card records about the data: path, split sizes, and the builder's manifest when present."""
    root = Path(data).expanduser().resolve()
    info: dict[str, Any] = {"path": str(root)}
    for name in ("manifest.json", "dataset_manifest.json"):
        file = root / name
        if root.is_dir() and file.is_file():
            try:
                info["manifest"] = json.loads(file.read_text(encoding="utf-8"))
            except ValueError:
                log.warning("could not parse %s", file)
            break
    if root.is_dir():
        try:
            import pyarrow.parquet as pq

            info["splits"] = {p.name: sum(pq.ParquetFile(f).metadata.num_rows for f in p.rglob("*.parquet"))
                              for p in sorted(root.iterdir()) if p.is_dir() and any(p.rglob("*.parquet"))}
        except ImportError:  # pragma: no cover - pyarrow comes with the finetune extra
            pass
    return info
