"""Contact sheets: a labelled grid of thumbnails, to show what the model saw (``tpru order --sheet``, ``tpru data
show``), and an atomic image writer.

Example:
    >>> from PIL import Image
    >>> frames = [Image.new("RGB", (200, 120), c) for c in ("red", "green", "blue")]
    >>> sheet = contact_sheet(frames, ["A", "B", "C"], title="three frames")
    >>> sheet.size
    (608, 279)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from tpru_agent.errors import ConfigError, FrameError
from tpru_agent.frames import load_frames
from tpru_agent.fsutil import atomic_path

_PAD = 8
_BACKGROUND = (255, 255, 255)
_CELL = (236, 236, 236)
_INK = (20, 20, 20)
_MUTED = (90, 90, 90)
_TITLE_BAR = (40, 44, 52)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis so that it fits in ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "...", font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most ``max_lines`` lines (the last one cut with an ellipsis)."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and _text_width(draw, f"{line} {words[0]}", font) <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:
        lines[-1] = lines[-1] + " " + " ".join(words)
    return [_fit_text(draw, line, font, width) for line in lines]


def default_columns(count: int) -> int:
    """One row for short sequences (up to 6), else a near-square grid at least 4 wide."""
    return count if count <= 6 else max(4, math.ceil(math.sqrt(count)))


def contact_sheet(images, labels: Sequence[str], *, title: str | None = None,
                  captions: Sequence[str] | None = None, columns: int | None = None,
                  thumb: int = 192) -> Image.Image:
    """A grid of thumbnails with a label over each, an optional caption under each and an optional title bar.

    Args:
        images: the frames (PIL images, arrays or paths: anything :func:`tpru_agent.frames.load_frames` accepts
            that gives one image per label).
        labels: one short label per image (``"A"``, ``"1: frame_3.png"``), drawn in bold-ish large type.
        title: a line across the top (the question, or the predicted order).
        captions: one line per image under its thumbnail (wrapped to two lines, then cut); ``None``: no captions.
        columns: thumbnails per row; default: one row up to 6 images, else a near-square grid.
        thumb: the side of the square each thumbnail fits in, in pixels (at least 48).

    Returns:
        An RGB image.

    Raises:
        ConfigError: labels or captions do not match the images in number, or thumb / columns are out of range.
        FrameError: an image cannot be loaded.

    Example:
        >>> from PIL import Image
        >>> contact_sheet([Image.new("RGB", (64, 64))] * 2, ["A", "B"]).size
        (408, 239)
    """
    frames = load_frames(list(images) if isinstance(images, (list, tuple)) else images, budget=None,
                         min_frames=1, what="sheet images")
    labels = _one_each(labels, len(frames), "labels", "give one label each")
    captions = None if captions is None else _one_each(captions, len(frames), "captions", "give one each")
    layout = _layout(len(frames), thumb, columns, captioned=captions is not None, titled=bool(title))
    sheet = Image.new("RGB", (layout.width, layout.height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.rectangle((0, 0, layout.width, layout.title_h - 1), fill=_TITLE_BAR)
        text = _fit_text(draw, title, layout.title_font, layout.width - 2 * _PAD)
        draw.text((_PAD, layout.title_h // 2), text, font=layout.title_font, fill=(255, 255, 255), anchor="lm")
    for k, frame in enumerate(frames):
        _draw_cell(sheet, draw, layout, k, frame, labels[k], None if captions is None else captions[k])
    return sheet


def _one_each(texts: Sequence[str], count: int, what: str, fix: str) -> list[str]:
    """``texts`` as strings, checked to be one per image."""
    texts = [str(t) for t in texts]
    if len(texts) != count:
        raise ConfigError(f"contact_sheet got {count} images but {len(texts)} {what}; {fix}")
    return texts


@dataclass(frozen=True)
class _Layout:
    """Where everything goes on a sheet: grid, fonts and the heights of a cell's parts."""

    thumb: int
    columns: int
    label_font: ImageFont.ImageFont | ImageFont.FreeTypeFont
    caption_font: ImageFont.ImageFont | ImageFont.FreeTypeFont
    title_font: ImageFont.ImageFont | ImageFont.FreeTypeFont
    label_h: int
    caption_lines: int
    cell_h: int
    title_h: int
    width: int
    height: int


def _layout(count: int, thumb, columns, *, captioned: bool, titled: bool) -> _Layout:
    """The sheet's layout for ``count`` thumbnails of side ``thumb`` in ``columns`` columns (default: see above).

    Raises:
        ConfigError: ``thumb`` is under 48 or not an integer, or ``columns`` is not a positive integer.
    """
    if isinstance(thumb, bool) or not isinstance(thumb, int) or thumb < 48:
        raise ConfigError(f"thumb must be an integer of at least 48 pixels, got {thumb!r}")
    columns = default_columns(count) if columns is None else columns
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ConfigError(f"columns must be a positive integer, got {columns!r}")
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    label_font, caption_font = _font(max(14, thumb // 9)), _font(max(11, thumb // 14))
    title_font = _font(max(16, thumb // 8))
    label_h = label_font.size + 10
    caption_lines = 2 if captioned else 0
    caption_h = caption_lines * (caption_font.size + 4) + (4 if caption_lines else 0)
    cell_h = label_h + thumb + caption_h
    title_h = title_font.size + 16 if titled else 0
    return _Layout(thumb=thumb, columns=columns, label_font=label_font, caption_font=caption_font,
                   title_font=title_font, label_h=label_h, caption_lines=caption_lines, cell_h=cell_h,
                   title_h=title_h, width=_PAD + columns * (thumb + _PAD),
                   height=title_h + _PAD + rows * (cell_h + _PAD))


def _draw_cell(sheet: Image.Image, draw: ImageDraw.ImageDraw, layout: _Layout, k: int, frame: Image.Image,
               label: str, caption: str | None) -> None:
    """Draw thumbnail ``k``: its label above, the frame fitted in a grey square, its caption under it."""
    thumb = layout.thumb
    row, col = divmod(k, layout.columns)
    x = _PAD + col * (thumb + _PAD)
    y = layout.title_h + _PAD + row * (layout.cell_h + _PAD)
    label = _fit_text(draw, label, layout.label_font, thumb - 4)
    draw.text((x + thumb // 2, y + layout.label_h // 2), label, font=layout.label_font, fill=_INK, anchor="mm",
              stroke_width=1, stroke_fill=_INK)
    top = y + layout.label_h
    draw.rectangle((x, top, x + thumb - 1, top + thumb - 1), fill=_CELL)
    small = ImageOps.contain(frame, (thumb, thumb), Image.Resampling.LANCZOS)
    sheet.paste(small, (x + (thumb - small.width) // 2, top + (thumb - small.height) // 2))
    if caption is not None:
        line_y = top + thumb + 4
        for line in _wrap(draw, caption, layout.caption_font, thumb - 2, layout.caption_lines):
            draw.text((x + 1, line_y), line, font=layout.caption_font, fill=_MUTED)
            line_y += layout.caption_font.size + 4


def save_image(image: Image.Image, path) -> Path:
    """Write ``image`` atomically (:func:`tpru_agent.fsutil.atomic_path`), creating parent folders.

    The format follows the extension (``.png``, ``.jpg``, ``.webp``...).

    Args:
        image: a PIL image.
        path: where to write it.

    Returns:
        The path written.

    Raises:
        ConfigError: the extension is not an image format PIL can write.

    Example:
        >>> save_image(contact_sheet(frames, ["A", "B", "C"]), "out/sheet.png")   # doctest: +SKIP
        PosixPath('out/sheet.png')
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ConfigError(f"cannot write images with extension {path.suffix!r} ({str(path)!r}); use .png or .jpg")
    if not isinstance(image, Image.Image):
        raise FrameError(f"save_image needs a PIL image, got {type(image).__name__}", source=str(path))
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)
    return path
