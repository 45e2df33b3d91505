"""A content-keyed, byte-bounded LRU of prompt-prefix key/value caches and per-image visual features.

A robot or GUI loop asks nearly the same question every frame: the chat template start, the answer rules, the
description and most frames do not change. The hf engine keeps the key/value cache of each prompt it ran here and,
for a new prompt, starts from the longest cached prefix, running only the tokens after it. A prefix is identified
by its content: the token ids together with the content hash of every image it shows (the token ids alone are the
same for any two images, each image being a run of ``<|image_pad|>`` tokens). Visual features are kept per image
(by content hash), so a frame is encoded once however many prompts it later appears in.

Exactness: causal attention makes the keys and values of a token depend only on the tokens (and image features)
before it and on its own position, and Qwen2.5-VL's M-RoPE positions of a prefix depend only on that prefix; so
a cached prefix is exactly what a fresh run would compute (up to float summation order).

Example:
    >>> import numpy as np
    >>> a = (np.array([1, 2, 9, 9, 3]), ((2, 4, "img-a"),))
    >>> b = (np.array([1, 2, 9, 9, 4]), ((2, 4, "img-b"),))
    >>> match_length(*a, *a), match_length(*a, *b)
    (5, 2)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from tpru_agent.images import fingerprint

#: (start, end, key): an image's token run ``ids[start:end]`` and the hash of its pixels.
Span = tuple[int, int, str]


#: Content hash of a PIL image (mode, size and pixels): equal images share visual features and prefixes.
image_key = fingerprint


def match_length(ids_a: np.ndarray, spans_a: Sequence[Span], ids_b: np.ndarray, spans_b: Sequence[Span]) -> int:
    """Length of the longest common prefix of two prompts, comparing images by content, not by their pad tokens.

    Where the token ids agree, an image of one prompt must be the same image (same start, same content key) in
    the other; the first one that is not ends the common prefix at its first token. (An image pad token that is
    plain text on one side, e.g. generated, never matches a real image on the other.)
    """
    n = min(len(ids_a), len(ids_b))
    diff = np.flatnonzero(ids_a[:n] != ids_b[:n])
    m = int(diff[0]) if len(diff) else n
    for spans_x, spans_y in ((spans_a, spans_b), (spans_b, spans_a)):
        other = {start: key for start, _, key in spans_y}
        for start, _, key in spans_x:
            if start >= m:
                break
            if other.get(start) != key:
                m = start
                break
    return m


def tensors_nbytes(tensors) -> int:
    """Bytes held by an iterable of tensors (``None`` entries skipped)."""
    return sum(int(t.numel()) * t.element_size() for t in tensors if t is not None)


def kv_nbytes(cache) -> int:
    """Bytes of a transformers ``DynamicCache`` (keys and values of every layer)."""
    return tensors_nbytes(t for layer in getattr(cache, "layers", ()) for t in (layer.keys, layer.values))


def fork(cache, length: int | None = None):
    """A copy of a ``DynamicCache`` that can be extended, cropped or batch-repeated without touching ``cache``.

    Only the cache and layer objects are copied: every ``DynamicLayer`` operation (update, crop, repeat) assigns new
    tensors instead of writing into the old ones, so the stored tensors are shared, not duplicated. ``length``
    keeps the first ``length`` positions.
    """
    import copy

    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if length is not None:
        for layer in new.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
    return new


@dataclass
class _Prefix:
    ids: np.ndarray
    spans: tuple[Span, ...]
    cache: Any
    nbytes: int


@dataclass
class _Feature:
    value: Any
    nbytes: int


class PrefixCache:
    """LRU over prompt prefixes (key/value caches) and image features, within one byte budget.

    Args:
        budget_bytes: total bytes kept; 0 disables caching (every lookup misses, nothing is stored).

    Stored caches are never modified: a caller extends a :func:`fork` of what :meth:`lookup` returns. All methods
    take an internal lock, so threads may share one cache (the hf engine also serialises its model calls).
    """

    def __init__(self, budget_bytes: int):
        self.budget = max(0, int(budget_bytes))
        self._items: OrderedDict[tuple, _Prefix | _Feature] = OrderedDict()
        self._lock = threading.RLock()
        self._bytes = 0
        self._serial = 0
        self.stats = dict(lookups=0, hits=0, reused_tokens=0, computed_tokens=0, evictions=0, image_hits=0,
                          image_misses=0, too_large=0)

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    # ------------------------------------------------------------------ prefixes
    def lookup(self, ids: np.ndarray, spans: Sequence[Span]) -> tuple[int, Any]:
        """The longest cached prefix of ``ids``: ``(length, stored cache)``, or ``(0, None)``.

        The stored cache may be longer than ``length``: :func:`fork` it with ``length`` before use.
        """
        with self._lock:
            self.stats["lookups"] += 1
            best, best_key = 0, None
            for key, item in self._items.items():
                if key[0] != "kv":
                    continue
                m = match_length(item.ids, item.spans, ids, spans)
                if m > best:
                    best, best_key = m, key
            if best_key is None:
                return 0, None
            self._items.move_to_end(best_key)
            self.stats["hits"] += 1
            return best, self._items[best_key].cache

    def put(self, ids: np.ndarray, spans: Sequence[Span], cache) -> None:
        """Keep ``cache`` (covering exactly ``ids``); entries it extends are dropped, the LRU ones evicted to fit."""
        if not self.enabled:
            return
        nbytes = kv_nbytes(cache)
        with self._lock:
            if nbytes > self.budget:
                self.stats["too_large"] += 1
                return
            spans = tuple(spans)
            for key in [k for k, v in self._items.items() if k[0] == "kv" and len(v.ids) <= len(ids)]:
                old = self._items[key]
                if match_length(old.ids, old.spans, ids, spans) == len(old.ids):  # a prefix of the new entry
                    self._drop(key)
            self._serial += 1
            self._items[("kv", self._serial)] = _Prefix(np.array(ids, dtype=np.int64), spans, cache, nbytes)
            self._bytes += nbytes
            self._fit()

    # ------------------------------------------------------------------ image features
    def feature(self, key: str):
        """The stored visual features of the image with content hash ``key``, or ``None``."""
        with self._lock:
            item = self._items.get(("img", key))
            if item is None:
                self.stats["image_misses"] += 1
                return None
            self._items.move_to_end(("img", key))
            self.stats["image_hits"] += 1
            return item.value

    def put_feature(self, key: str, value, nbytes: int) -> None:
        if not self.enabled or nbytes > self.budget:
            return
        with self._lock:
            if ("img", key) in self._items:
                self._drop(("img", key))
            self._items[("img", key)] = _Feature(value, nbytes)
            self._bytes += nbytes
            self._fit()

    # ------------------------------------------------------------------ housekeeping
    def count(self, reused: int, computed: int) -> None:
        """Record how many prompt tokens one prefill took from the cache and how many it ran."""
        with self._lock:
            self.stats["reused_tokens"] += reused
            self.stats["computed_tokens"] += computed

    def _drop(self, key: tuple) -> None:
        self._bytes -= self._items.pop(key).nbytes

    def _fit(self) -> None:
        while self._bytes > self.budget and self._items:
            self._drop(next(iter(self._items)))
            self.stats["evictions"] += 1

    def clear(self) -> None:
        """Forget every prefix and feature (statistics are kept)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def info(self) -> dict:
        """Budget, bytes used, entries (prefixes, images) and the counters since creation."""
        with self._lock:
            lengths = [len(v.ids) for k, v in self._items.items() if k[0] == "kv"]
            total = self.stats["reused_tokens"] + self.stats["computed_tokens"]
            return {"budget_bytes": self.budget, "bytes": self._bytes, "prefixes": len(lengths),
                    "images": len(self._items) - len(lengths), "longest_prefix_tokens": max(lengths, default=0),
                    **self.stats,
                    "reused_fraction": self.stats["reused_tokens"] / total if total else 0.0}


__all__ = ["PrefixCache", "Span", "fork", "image_key", "kv_nbytes", "match_length", "tensors_nbytes"]
