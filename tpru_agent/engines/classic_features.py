"""The classic engine's frame features: an area-averaged Lab pyramid and an HSV histogram per frame, and the
distance between two frames (see :mod:`tpru_agent.engines.classic` for how the engine scores answers with it)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tpru_agent.errors import FrameError
from tpru_agent.images import fingerprint


@dataclass(frozen=True)
class ClassicConfig:
    """Feature weights, temperatures and "None" thresholds (their meaning: :mod:`tpru_agent.engines.classic`)."""

    grid_sizes: tuple[int, ...] = (32, 16, 8, 4)
    colour_weight: float = 1.0
    hist_weight: float = 1.0
    order_temperature: float = 0.2
    choice_temperature: float = 2.0
    order_weight: float = 2.0
    backward_cost: float = 4.0
    backward_steps: float = 0.25
    none_cost: float = 3.0
    duplicate_cost: float = 2.0
    duplicate_steps: float = 0.75
    none_order_margin: float = 0.3
    cache_size: int = 256


class Features:
    """Features of frames, cached by content (the ``cache_size`` most recent), and their distance matrix."""

    def __init__(self, config: ClassicConfig, cv2):
        self.config = config
        self._cv2 = cv2
        self._cache: OrderedDict[bytes, tuple] = OrderedDict()

    def clear(self) -> None:
        """Drop every cached feature."""
        self._cache.clear()

    def of(self, image) -> tuple[np.ndarray, np.ndarray]:
        """(Lab pyramid, HSV histogram) of one PIL image, cached by content."""
        cv2 = self._cv2
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image))
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise FrameError(f"the classic engine needs RGB images, got an array of shape {rgb.shape}")
        key = fingerprint(rgb)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        small = cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_AREA)
        lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32) / 255.0
        hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, [12, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
        hist = hist / max(float(hist.sum()), 1.0)
        feats = (self._pyramid(lab), hist.astype(np.float32))
        self._cache[key] = feats
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)
        return feats

    def _pyramid(self, img: np.ndarray) -> np.ndarray:
        """Area-averaged copies at each grid size, each level's values scaled so every level weighs the same.

        Coarse levels make the distance grow smoothly with how far something moved (at a fine level an object
        that moved more than its own size is simply "elsewhere").
        """
        cv2 = self._cv2
        levels = []
        for n in self.config.grid_sizes:
            # the blur spreads each cell into its neighbours, so a shift by one cell is only a partial change
            level = cv2.GaussianBlur(cv2.resize(img, (n, n), interpolation=cv2.INTER_AREA), (3, 3), 0).ravel()
            levels.append(level / (level.size * len(self.config.grid_sizes)))
        return np.concatenate(levels)

    def distances(self, images: Sequence) -> np.ndarray:
        """Symmetric matrix of frame distances (0 on the diagonal)."""
        cfg = self.config
        feats = [self.of(im) for im in images]
        colour, hist = (np.stack([f[k] for f in feats]).astype(np.float64) for k in range(2))

        def l1(x: np.ndarray) -> np.ndarray:
            return np.abs(x[:, None, :] - x[None, :, :]).sum(axis=2)

        # pyramid: mean absolute difference averaged over levels; histograms: total variation (0..1)
        return cfg.colour_weight * l1(colour) + cfg.hist_weight * 0.5 * l1(hist)


__all__ = ["ClassicConfig", "Features"]
