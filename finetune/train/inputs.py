"""TPRU-layout datasets as TRL inputs: conversational multi-image prompts, images at the pixel budget.

A TPRU row (``problem`` with one ``<image>`` per image, ``images``, ``answer``) becomes what TRL's GRPO and SFT
trainers take for a vision-language model: a ``prompt`` with one user turn whose content interleaves
``{"type": "text"}`` parts and ``{"type": "image"}`` placeholders in the problem's order (TRL fills the
placeholders from ``images`` in order), the ``images`` resized to the TPRU budget, and the ``answer`` and
metadata columns the rewards read. The answer-rules preamble is added here (:func:`tpru_agent.tasks.render_prompt`),
the same function the SDK uses at inference, so training and serving prompts cannot drift.

Rows are converted on access (``datasets`` transform), so the images stay encoded on disk until a batch needs them.
Prompts longer than ``max_prompt_length`` tokens (text plus image tokens, as the model sees them) are left out,
as the authors' EasyR1 run did (``filter_overlong_prompts``, 7,000); the count is logged and reported. The
``answer`` column reaches the reward as stored (the authors' reward compares it unstripped); rows whose answer has
surrounding whitespace can never score, and are counted in a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tpru_agent.errors import ConfigError, require
from tpru_agent.finetune.data.tpru_format import looks_served, stored_budget
from tpru_agent.sizing import TRAINED_MAX, TRAINED_MIN
from tpru_agent.tasks import IMAGE, render_prompt
from tpru_agent.tasks.question import split_images

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
    chunks = split_images(text, text.count(IMAGE))   # the one <image> splitter every engine uses
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
    from tpru_agent.finetune.data.tpru_format import parquet_files

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


def prompt_lengths(ds, processor, *, template: str | None, budget, as_stored: bool = False) -> list[int]:
    """Tokens of each row's prompt as the model sees it: chat text, plus the visual tokens of its resized images.

    Image sizes come from the encoded headers (no pixels are decoded) and :func:`tpru_agent.sizing.budget_size`
    (``as_stored``: images that look served at ``budget`` are used as stored); the text is tokenized in batches.
    """
    import io

    from PIL import Image

    from tpru_agent.sizing import budget_size

    raw = ds.with_format("arrow")  # encoded image structs, no decoding, no transform
    factor = getattr(processor.image_processor, "patch_size", 14) * getattr(processor.image_processor,
                                                                            "merge_size", 2)
    lengths: list[int] = []
    for start in range(0, len(raw), 256):
        rows = raw[start:start + 256]
        texts = [processor.apply_chat_template(to_messages(p, template), tokenize=False, add_generation_prompt=True)
                 for p in rows.column("problem").to_pylist()]
        ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for tokens, images in zip(ids, rows.column("images").to_pylist()):
            visual = 0
            for image in images or []:
                with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as im:
                    w, h = im.size if as_stored and looks_served(im.size, budget) else budget_size(*im.size, budget)
                visual += (w // factor) * (h // factor) - 1  # the placeholder token is already counted
            lengths.append(len(tokens) + visual)
    return lengths


def drop_overlong(ds, processor, max_prompt_length: int | None, *, template: str | None, budget,
                  split: str, as_stored: bool = False) -> tuple[Any, dict[str, int]]:
    """``ds`` without rows whose prompt exceeds ``max_prompt_length`` tokens, and what was dropped.

    Raises:
        ConfigError: every row is too long (nothing would train), naming the longest and the key to raise.
    """
    if not max_prompt_length or processor is None or len(ds) == 0:
        return ds, {"dropped": 0, "rows": len(ds)}
    lengths = prompt_lengths(ds, processor, template=template, budget=budget, as_stored=as_stored)
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    report = {"dropped": len(ds) - len(keep), "rows": len(ds), "max_prompt_length": max_prompt_length,
              "longest": max(lengths)}
    if not keep:
        raise ConfigError(f"every prompt of split {split!r} is over max_prompt_length={max_prompt_length} tokens "
                          f"(longest {max(lengths)}); raise it (--set max_prompt_length=N) or use fewer/smaller "
                          "images")
    if report["dropped"]:
        log.warning("left out %d of %d prompts of split %r over %d tokens (longest %d), as the authors' run "
                    "did (filter_overlong_prompts)", report["dropped"], len(ds), split, max_prompt_length,
                    max(lengths))
        ds = ds.select(keep)
    return ds, report


def _warn_spaced_answers(ds, split: str) -> int:
    spaced = sum(1 for a in ds["answer"] if str(a) != str(a).strip())
    if spaced:
        log.warning("%d answers of split %r have surrounding whitespace: the TPRU reward compares the answer as "
                    "stored, as the authors' does, so those rows can never score; strip them in the data", spaced,
                    split)
    return spaced


def _typed_images(ds, datasets, files: list[str]):
    """The ``images`` column as image features, also when the file lost its type metadata (e.g. pandas rewrote it)."""
    feature = ds.features["images"]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image):
        return ds
    if isinstance(inner, dict) and "bytes" in inner:
        log.warning("%s: the images column has lost its image type (the file was rewritten without its Hugging "
                    "Face metadata, e.g. through pandas); reading its {bytes, path} cells as images", files[0])
        return ds.cast_column("images", datasets.List(datasets.Image()))
    raise ConfigError(f"{files[0]!r}: the images column holds {feature}, not images; each cell must be a list of "
                      "images (or of {bytes, path} structs); rebuild it with `tpru data build` or rewrite it with "
                      "pyarrow / datasets, which keep the image type")


def load_split(data: str | os.PathLike, split: str, *, template: str | None = None,
               min_pixels: int = TRAINED_MIN, max_pixels: int = TRAINED_MAX, limit: int | None = None,
               completion_fn: Callable[..., str] | None = None, cache_dir: str | None = None,
               processor=None, max_prompt_length: int | None = None, report: dict | None = None):
    """A ``datasets.Dataset`` of one split whose rows read as TRL multimodal examples.

    Each example: ``prompt`` (conversational, image placeholders), ``images`` (PIL, at the pixel budget),
    ``answer``, ``task``, ``domain``, ``negative``, ``episode_id`` and ``row_id`` (the row's index in the split,
    which the run logs to prove the data order on resume). With ``completion_fn(answer, task=, negative=)``, also
    ``completion``: the assistant turn supervised training targets. ``cache_dir``: where ``datasets`` keeps its
    memory-mapped copy (default: the Hugging Face datasets cache). With ``processor`` and ``max_prompt_length``,
    longer prompts are left out (:func:`drop_overlong`); ``report``, when given, receives ``overlong`` (what was
    dropped) and ``spaced_answers``.

    Raises:
        ConfigError: missing split, rows whose placeholders and images disagree.
    """
    datasets = require("datasets", "finetune", what="fine-tuning")
    from tpru_agent.sizing import PixelBudget, resize_to_budget

    files = [str(f) for f in split_files(data, split)]
    ds = datasets.Dataset.from_parquet(files, split="train", cache_dir=cache_dir)
    if "problem" not in ds.column_names or "images" not in ds.column_names or "answer" not in ds.column_names:
        raise ConfigError(f"{files[0]!r} is not in the TPRU layout: columns {ds.column_names}; need problem, "
                          "images, answer")
    ds = _typed_images(ds, datasets, files)
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    ds = ds.add_column("row_id", list(range(len(ds))))
    budget = PixelBudget(min_pixels=min_pixels, max_pixels=max_pixels, recorded=True)  # the run's own budget
    # frames a build stored at this very budget are used as stored: their size is not always a fixed point of the
    # resize (252x168 would become 224x168), and serving sizes a raw frame once
    as_stored = stored_budget(data) == budget
    if template is not None:
        render_prompt("", template)  # fail now, not in the middle of a batch
    ds, overlong = drop_overlong(ds, processor, max_prompt_length, template=template, budget=budget, split=split,
                                 as_stored=as_stored)
    spaced = _warn_spaced_answers(ds, split)
    if report is not None:
        report.update(overlong=overlong, spaced_answers=spaced)

    def transform(batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["problem"])
        out: dict[str, list] = {"prompt": [], "images": []}
        for i in range(n):
            problem, images = batch["problem"][i], list(batch["images"][i] or [])
            if problem.count(IMAGE) != len(images):
                raise ConfigError(f"row {batch['row_id'][i]} of split {split!r}: {problem.count(IMAGE)} {IMAGE} "
                                  f"placeholders but {len(images)} images; rebuild the dataset")
            out["prompt"].append(to_messages(problem, template))
            out["images"].append([img.convert("RGB") if as_stored and looks_served(img.size, budget)
                                  else resize_to_budget(img.convert("RGB"), budget) for img in images])
        for column in META_COLUMNS:
            default = False if column == "negative" else ""
            out[column] = batch.get(column, [default] * n)
        out["answer"] = [str(a) for a in out["answer"]]  # as stored: the reward compares it as the authors' does
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
