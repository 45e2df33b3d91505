"""Frames sized as TPRU's training pipeline sized them: the pixel budget and the authors' two resize steps.

TPRU was trained on images of about 16,384 to 36,864 pixels with sides that are multiples of 28 (Qwen2.5-VL: patch 14,
merge 2), about 40-50 visual tokens per frame. Serving at another size moves the model off its training
distribution, so :func:`resize_to_budget` resizes exactly as the authors' EasyR1 pipeline did: PIL scales into the
budget (:func:`pil_step_size`), then the checkpoint processor rounds each side to 28 (:func:`smart_resize`, the
Qwen2-VL processor arithmetic); :func:`budget_size` composes the two. :func:`folder_budget` / :func:`serving_budget`
read the budget a model folder records (:data:`BUDGET_FILE`). Loading frames is :mod:`tpru_agent.frames`.

Example:
    >>> from tpru_agent.sizing import budget_size
    >>> budget_size(640, 480)
    (224, 168)
"""

from __future__ import annotations

import json
import logging
import math
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tpru_agent.errors import ConfigError, FrameError
from tpru_agent.images import to_rgb

log = logging.getLogger(__name__)

#: TPRU training's pixel budget: smallest area, largest area, side multiple (Qwen2.5-VL: patch 14 x merge 2).
TRAINED_MIN, TRAINED_MAX, TRAINED_FACTOR = 16384, 36864, 28


@dataclass(frozen=True)
class PixelBudget:
    """How many pixels each frame gets, and the multiple its sides are rounded to.

    Attributes:
        min_pixels: smallest area after resizing (TPRU training: 16,384).
        max_pixels: largest area after resizing (TPRU training: 36,864, about 192 x 192).
        factor: both sides become multiples of it (Qwen2.5-VL: patch 14 x merge 2 = 28).
    """

    min_pixels: int = TRAINED_MIN
    max_pixels: int = TRAINED_MAX
    factor: int = TRAINED_FACTOR
    #: the budget a model folder records as its own training budget (:func:`folder_budget`): never "off".
    recorded: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PixelBudget.{name} must be a positive integer, got {value!r}")
        if self.max_pixels < self.factor ** 2:
            raise ConfigError(
                f"PixelBudget.max_pixels ({self.max_pixels}) is below one {self.factor}x{self.factor} patch; raise it"
            )
        if self.min_pixels > self.max_pixels:
            raise ConfigError(
                f"PixelBudget.min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels}); "
                "swap them or use tpru_agent.sizing.TPRU_BUDGET"
            )

    @classmethod
    def from_dict(cls, data: dict, *, recorded: bool = False) -> PixelBudget:
        """The budget :meth:`to_dict` wrote (``factor`` optional).

        Raises:
            ConfigError: ``data`` is not such a mapping (a missing key, a value that is not a positive integer).
        """
        try:
            factor = {"factor": data["factor"]} if "factor" in data else {}
            return cls(data["min_pixels"], data["max_pixels"], **factor, recorded=recorded)
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"{data!r} is not a pixel budget ({exc}); it must be "
                              '{"min_pixels": N, "max_pixels": M[, "factor": F]}') from None

    def to_dict(self) -> dict[str, int]:
        """``{"min_pixels", "max_pixels", "factor"}``: how results, model info and build manifests record it."""
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "factor": self.factor}

    @property
    def off_distribution(self) -> bool:
        """True when this budget is far from the range TPRU was trained on."""
        return not self.recorded and (self.min_pixels < TRAINED_MIN * 0.5 or self.max_pixels > TRAINED_MAX * 2
                or self.factor != TRAINED_FACTOR)


TPRU_BUDGET = PixelBudget()
#: The Qwen2.5-VL checkpoint processor's own budget (``preprocessor_config.json`` of Qwen2.5-VL-3B/7B-Instruct).
#: In TPRU training it only rounds each side to a multiple of 28, after the PIL step has met the TPRU budget.
PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS = 3136, 12845056
_warned_budgets: set[PixelBudget] = set()


MAX_RATIO = 200
#: File in a model folder that records the pixel budget the model was trained at (written by the training recipes,
#: e.g. tpru-nano's); the SDK serves such a model at that budget.
BUDGET_FILE = "tpru_budget.json"


def folder_budget(folder: str | os.PathLike | None) -> PixelBudget | None:
    """The pixel budget a model folder records in :data:`BUDGET_FILE`, or ``None`` when it records none.

    Raises:
        ConfigError: the file exists but does not hold ``{"min_pixels": int, "max_pixels": int[, "factor": int]}``.
    """
    if folder is None:
        return None
    path = Path(folder) / BUDGET_FILE
    if not path.is_file():
        return None
    try:
        return PixelBudget.from_dict(json.loads(path.read_text(encoding="utf-8")), recorded=True)
    except (ValueError, TypeError, ConfigError) as exc:
        raise ConfigError(f"{path} is not a valid pixel budget ({exc}); it must hold "
                          '{"min_pixels": N, "max_pixels": M}; fix or delete it') from None


def serving_budget(folder: str | os.PathLike | None, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> PixelBudget:
    """The budget to serve a model at: explicit pixels beat the folder's own record, which beats TPRU's."""
    base = folder_budget(folder) or TPRU_BUDGET
    if min_pixels is None and max_pixels is None:
        return base
    return PixelBudget(min_pixels=base.min_pixels if min_pixels is None else min_pixels,
                       max_pixels=base.max_pixels if max_pixels is None else max_pixels, factor=base.factor,
                       recorded=base.recorded)


def _check_ratio(width: int, height: int) -> None:
    if max(height, width) / max(1, min(height, width)) > MAX_RATIO:
        raise FrameError(f"a {width}x{height} image has an aspect ratio above {MAX_RATIO}:1, which the model "
                         "cannot take; crop it first")


def smart_resize(height: int, width: int, factor: int = TRAINED_FACTOR, min_pixels: int = PROCESSOR_MIN_PIXELS,
                 max_pixels: int = PROCESSOR_MAX_PIXELS) -> tuple[int, int]:
    """``(height, width)`` as the Qwen2-VL image processor's ``smart_resize`` computes them.

    The same integer arithmetic (tests compare the two over a grid of sizes). It lives here rather than being
    imported because importing transformers or qwen-vl-utils imports torch (seconds per process), which the bare
    install, the classic engine and the data builder's workers must not pay for a few lines of maths.

    Raises:
        FrameError: the aspect ratio is above 200:1 (Qwen2.5-VL's limit).
    """
    _check_ratio(width, height)
    h_bar = round(height / factor) * factor   # may be 0 for a side under factor / 2: the min_pixels branch fixes it
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pil_step_size(width: int, height: int, budget: PixelBudget = TPRU_BUDGET) -> tuple[int, int]:
    """``(width, height)`` after the first of TPRU's two resize steps (EasyR1's ``process_image``).

    Above ``max_pixels`` the image is scaled by ``sqrt(max_pixels / (w * h))``; below ``min_pixels`` by
    ``sqrt(min_pixels / (w * h))``; sides are truncated to integers, as ``int()`` does in the authors' code.
    """
    if width * height > budget.max_pixels:
        scale = math.sqrt(budget.max_pixels / (width * height))
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    if width * height < budget.min_pixels:
        scale = math.sqrt(budget.min_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width, height


def budget_size(width: int, height: int, budget: PixelBudget = TPRU_BUDGET) -> tuple[int, int]:
    """``(width, height)`` a ``width`` x ``height`` frame reaches the model at, as TPRU was trained.

    Two steps, as the authors' EasyR1 pipeline runs them (TPRU.md, "The prompt and answer contract"): PIL scales the
    image into ``[min_pixels, max_pixels]`` (:func:`pil_step_size`), then the checkpoint's processor, at its own wide
    default budget, rounds each side to the nearest multiple of ``budget.factor`` (:func:`smart_resize`). So
    224x224 -> 192x192 -> 196x196 (49 tokens) and 640x480 -> 221x166 -> 224x168 (48 tokens). The area may end a
    little above ``max_pixels`` (196 x 196 = 38,416): that is what training saw.

    Raises:
        FrameError: the aspect ratio is beyond what Qwen2.5-VL accepts (200:1).

    Example:
        >>> budget_size(640, 480)
        (224, 168)
    """
    _check_ratio(width, height)
    mid_w, mid_h = pil_step_size(width, height, budget)
    new_h, new_w = smart_resize(mid_h, mid_w, budget.factor, PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS)
    return new_w, new_h


def resize_to_budget(image: Image.Image, budget: PixelBudget = TPRU_BUDGET) -> Image.Image:
    """Resize ``image`` as TPRU's training pipeline did (:func:`budget_size`; keeps the aspect ratio).

    Both steps are applied here, with PIL's bicubic filter as in training, so the frame reaches any engine at its
    final size and the checkpoint processor's rounding is a no-op.

    Args:
        image: any PIL image; the result is RGB.
        budget: pixel range and side multiple; :data:`TPRU_BUDGET` matches TPRU training.

    Returns:
        An RGB image whose sides are multiples of ``budget.factor``.

    Raises:
        FrameError: the aspect ratio is beyond what Qwen2.5-VL accepts (200:1).

    Example:
        >>> from PIL import Image
        >>> resize_to_budget(Image.new("RGB", (640, 480))).size
        (224, 168)
    """
    if budget.off_distribution and budget not in _warned_budgets:
        _warned_budgets.add(budget)
        log.warning(
            "pixel budget %s is far from TPRU's training range (%d-%d px, factor %d): expect a distribution "
            "shift and lower accuracy", budget, TRAINED_MIN, TRAINED_MAX, TRAINED_FACTOR,
        )
    if is_served(image, budget):
        return image
    image = to_rgb(image)
    width, height = image.size
    final = budget_size(width, height, budget)
    if final == (width, height):
        # Already at its served size (the SDK sized it, or it was made that size): resizing again would blur it.
        return mark_served(image, budget)
    mid = pil_step_size(width, height, budget)
    if mid != (width, height):
        image = image.resize(mid, Image.Resampling.BICUBIC)   # Image.resize's default filter, as in EasyR1
    if final != image.size:
        image = image.resize(final, Image.Resampling.BICUBIC)  # the Qwen2-VL processor resamples bicubically
    return mark_served(image, budget)


# A served size is not always a fixed point of the two steps: a 253x163 frame is served at 252x168 (42,336 px, over
# the budget once rounded up to 28), and a fresh 252x168 frame would be served at 224x168. So every image this module
# sizes is marked as served at its budget, and a marked image passed in again (the checker's history, frames from
# ``load_frames`` handed to a TPRU call, an engine sizing the facade's frames) comes back untouched. The mark lives
# beside the image (keyed by identity, dropped when the image is freed), not in it: a copy, a crop or a resize is a
# new object, unmarked, and is sized like any other frame.
# No lock: single dict operations are atomic, and a lock taken here would deadlock when a garbage collection
# inside _mark frees a marked image whose callback (_forget) runs on the same thread. An address is not reused while
# its object's callback runs, so _forget cannot drop a newer mark made at the same address.
_MARKS: dict[int, tuple[weakref.ref, PixelBudget, tuple[int, int]]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _MARKS.get(key)
    if entry is not None and entry[0] is ref:
        _MARKS.pop(key, None)


def mark_served(image: Image.Image, budget: PixelBudget) -> Image.Image:
    """Declare ``image`` already at its served size for ``budget`` (returns it): :func:`resize_to_budget` passes
    it through. For frames sized before they were stored, e.g. by ``tpru data build``, whose dataset records the
    budget (:func:`tpru_agent.finetune.data.tpru_format.stored_budget`)."""
    key = id(image)
    _MARKS[key] = (weakref.ref(image, lambda r, key=key: _forget(key, r)), budget, tuple(image.size))
    return image


def is_served(image, budget: PixelBudget) -> bool:
    """True when :func:`resize_to_budget` sized (or passed) this very image at ``budget`` and it kept that size.

    Example:
        >>> frame = resize_to_budget(Image.new("RGB", (253, 163)))
        >>> frame.size, is_served(frame, TPRU_BUDGET), resize_to_budget(frame) is frame
        ((252, 168), True, True)
        >>> is_served(frame.copy(), TPRU_BUDGET)
        False
    """
    entry = _MARKS.get(id(image))
    return (entry is not None and entry[0]() is image and entry[1] == budget
            and tuple(getattr(image, "size", ())) == entry[2])
