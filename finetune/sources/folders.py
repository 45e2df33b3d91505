"""Episodes from folders of frames: each subfolder of ``root`` is one episode (frames in natural file order).

An optional ``meta.json`` sets ``description`` / ``domain`` / ``task``: one in ``root`` gives defaults for every
episode, one inside an episode folder overrides them. A ``root`` that holds images and no episode folders is one
episode itself.

Example:
    >>> from tpru_agent.finetune.sources.folders import folder_episodes
    >>> for ep in folder_episodes("runs/", domain="lego"):   # doctest: +SKIP
    ...     print(ep.episode_id, len(ep), ep.description)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from tpru_agent.errors import ConfigError, FrameError
from tpru_agent.finetune.data.features import fit_budget
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

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
META_FILE = "meta.json"


def _images(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def list_episodes(root: str | Path) -> list[str]:
    """Names of the episode folders under ``root`` in natural order (``["."]`` when ``root`` is one episode).

    Raises:
        ConfigError: ``root`` is missing, or holds neither images nor folders.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"frames source {str(root)!r} is not a folder; pass a folder of episode folders "
                          "(one subfolder of images per episode)")
    subdirs = sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural_key)
    if subdirs:
        return subdirs
    if _images(root):
        return ["."]
    raise ConfigError(f"frames source {str(root)!r} holds no episode folders and no images; each episode is a "
                      "subfolder of frames (png/jpg) in time order")


def folder_episodes(root: str | Path, *, episodes: Sequence[str] | None = None, domain: str | None = None,
                    description: str | None = None, task: str | None = None, max_frames: int = 16,
                    min_frames: int = 4, on_skip: SkipFn | None = None) -> Iterator[Episode]:
    """Yield one :class:`Episode` per episode folder, frames resized to the TPRU pixel budget.

    Args:
        root: folder of episode folders (or one episode folder).
        episodes: names of the episode folders to read (default: all, see :func:`list_episodes`).
        domain: domain when no ``meta.json`` sets one (default ``"custom"``).
        description: description when no ``meta.json`` sets one (default none: questions carry no description).
        task: task identity when no ``meta.json`` sets one (default: the description).
        max_frames: at most this many frames per episode, spread evenly over the folder's frames.
        min_frames: episodes with fewer frames are skipped (reported through ``on_skip``).
        on_skip: told ``(episode_id, reason)`` for each episode dropped (too short, unreadable frame).

    Raises:
        ConfigError: ``root`` or a named episode folder is missing, or a ``meta.json`` is malformed.
    """
    from tpru_agent.frames import load_frame

    check_count("max_frames", max_frames)
    check_count("min_frames", min_frames)
    root = Path(root).expanduser()
    names = list(episodes) if episodes is not None else list_episodes(root)
    defaults = {"domain": domain or "custom", "description": description or "", "task": task or ""}
    defaults.update({k: v for k, v in read_meta(root / META_FILE).items() if k in defaults and v})
    for name in names:
        folder = root / name
        episode_id = text_name(f"{root.name}/{name}" if name != "." else root.name)
        if not folder.is_dir():
            raise ConfigError(f"episode folder {str(folder)!r} does not exist")
        meta = {**defaults, **{k: v for k, v in read_meta(folder / META_FILE).items() if k in defaults and v}}
        files = _images(folder)
        if len(files) < min_frames:
            skip(on_skip, episode_id, f"too few frames: {len(files)} images, need {min_frames}")
            continue
        picked = [files[i] for i in even_indices(len(files), max_frames)]
        try:
            frames = tuple(fit_budget(load_frame(f, budget=None, index=i)) for i, f in enumerate(picked))
        except FrameError as exc:
            skip(on_skip, episode_id, f"unreadable frame: {exc}")
            continue
        yield Episode(
            episode_id=episode_id, frames=frames, description=meta["description"], domain=meta["domain"],
            task=meta["task"] or meta["description"],
            meta={"source": "frames", "path": text_name(folder), "files": [text_name(f.name) for f in picked],
                  "total_frames": len(files)},
        )
