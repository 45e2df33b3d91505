"""Helpers shared by the episode sources: skip reporting, even sampling, sidecar metadata."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from tpru_agent.errors import ConfigError

log = logging.getLogger(__name__)

#: ``on_skip(episode_id, reason)``: told about every episode a source drops, so no drop is silent. The reason
#: reads "category: detail" (the category is what the manifest counts).
SkipFn = Callable[[str, str], None]
#: Episode metadata keys a ``meta.json`` (or a video's sidecar ``.json``) may set.
META_KEYS = ("description", "domain", "task")


def text_name(name) -> str:
    """A file name as storable text: bytes that are not UTF-8 (kept by Python as surrogates) become ``\\xff``.

    Example:
        >>> text_name("ep\\udcff")
        'ep\\\\xff'
    """
    return os.fsencode(os.fspath(name)).decode("utf-8", "backslashreplace")


def skip(on_skip: SkipFn | None, episode_id: str, reason: str) -> None:
    """Report a dropped episode to ``on_skip``, or log it when nobody listens."""
    if on_skip is None:
        log.warning("skipping episode %s: %s", episode_id, reason)
    else:
        on_skip(episode_id, reason)


def even_indices(count: int, wanted: int) -> list[int]:
    """Up to ``wanted`` distinct indices spread evenly over ``range(count)``, first and last included.

    Example:
        >>> even_indices(10, 4)
        [0, 3, 6, 9]
    """
    if count <= 0 or wanted <= 0:
        return []
    if wanted >= count:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, wanted).round().astype(int).tolist()))


def natural_key(name: str):
    """Sort key that puts ``frame_2`` before ``frame_10``."""
    parts = re.split(r"(\d+)", name.lower())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], name


def read_meta(path: Path) -> dict:
    """The description / domain / task a JSON sidecar sets ({} when the file is absent).

    Raises:
        ConfigError: the file is not a JSON object, or a value is not a string.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({exc}); fix it or delete it") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a JSON object such as "
                          '{"description": "open the drawer", "domain": "robot"}')
    for key in META_KEYS:
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{str(path)!r}: {key!r} must be a string, got {type(data[key]).__name__}")
    return data


def check_count(name: str, value: int, low: int = 1) -> int:
    """Validate an integer option of a source."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
