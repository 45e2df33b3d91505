"""Small perceptual features of a frame: near-duplicate tests and "looks alike" distances for hard distractors.

Two thumbnails per frame, both area-averaged (so sensor noise and re-encoding wash out, a moved object does not):

- ``thumb``: 32 x 32 grayscale followed by 16 x 16 RGB (colour matters: a red and a green block can have the same
  gray). Two frames are *near-duplicates* when no thumbnail value differs by more than ``max_diff`` (default 12 of
  255). A maximum, not a mean: a ticked checkbox or a moved gripper changes a few thumbnail pixels a lot, and those
  frames must stay distinct; a static scene re-encoded changes all pixels a little.
- ``embed``: 16 x 16 RGB. Euclidean distance ranks how alike two frames look (the hard distractors are the
  closest frames that are not near-duplicates).

Example:
    >>> from PIL import Image
    >>> f = frame_features(Image.new("RGB", (64, 48), "white"))
    >>> len(f.thumb), len(f.embed)
    (1792, 768)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THUMB_SIDE = 32
EMBED_SIDE = 16
#: Length of a thumbnail vector: 32x32 gray then 16x16x3 colour.
THUMB_LEN = THUMB_SIDE * THUMB_SIDE + EMBED_SIDE * EMBED_SIDE * 3
#: Default near-duplicate threshold: the largest thumbnail pixel difference (0-255) still called "the same".
NEAR_DUP_MAX_DIFF = 12


@dataclass(frozen=True)
class FrameFeatures:
    """Perceptual features of one frame (see the module docstring)."""

    thumb: bytes
    embed: bytes


def budget_size(width: int, height: int, budget=None) -> tuple[int, int]:
    """(width, height) after the TPRU pixel-budget resize (:func:`tpru_agent.sizing.budget_size`)."""
    from tpru_agent.sizing import TPRU_BUDGET
    from tpru_agent.sizing import budget_size as sized

    return sized(width, height, budget or TPRU_BUDGET)


def fit_budget(image, budget=None):
    """An RGB copy of ``image`` at the pixel budget: :func:`tpru_agent.sizing.resize_to_budget` (no torch import)."""
    from tpru_agent.sizing import TPRU_BUDGET, resize_to_budget

    return resize_to_budget(image, budget or TPRU_BUDGET)


def frame_features(image) -> FrameFeatures:
    """Thumbnails of an RGB PIL image."""
    from PIL import Image

    box = Image.Resampling.BOX
    thumb = image.convert("L").resize((THUMB_SIDE, THUMB_SIDE), box)
    embed = image.convert("RGB").resize((EMBED_SIDE, EMBED_SIDE), box)
    return FrameFeatures(thumb.tobytes() + embed.tobytes(), embed.tobytes())


def thumbs_array(thumbs) -> np.ndarray:
    """Stack thumbnail bytes into an (n, THUMB_LEN) int16 array (int16: differences need a sign)."""
    return np.frombuffer(b"".join(thumbs), dtype=np.uint8).reshape(-1, THUMB_LEN).astype(np.int16)


def max_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest pixel difference between thumbnail rows: ``a`` (n, d) against ``b`` (d,) or (n, d)."""
    return np.abs(a - b).max(axis=-1)


def dedup_consecutive(thumbs: np.ndarray, threshold: int = NEAR_DUP_MAX_DIFF) -> list[int]:
    """Indices to keep so that no kept frame is a near-duplicate of the previously kept one."""
    keep: list[int] = []
    for i in range(len(thumbs)):
        if not keep or max_diff(thumbs[i], thumbs[keep[-1]]) > threshold:
            keep.append(i)
    return keep
