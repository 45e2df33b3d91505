"""A picture of a :class:`~tpru_agent.results.ProgressResult`: progress against input frame index over a strip of
the frames (matplotlib when installed, else drawn with PIL, like the contact sheets of :mod:`tpru_agent.cli.sheet`).

Example:
    >>> r = TPRU("classic").progress("episode/")                                  # doctest: +SKIP
    >>> save_image(progress_plot(load_frames("episode/", budget=None), r), "p.png")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import io
from typing import Sequence

from PIL import Image, ImageDraw, ImageOps

from tpru_agent.cli.sheet import _font

_THUMB = 72
_INK, _GRID, _LINE, _BG = (40, 40, 40), (220, 220, 220), (76, 114, 176), (255, 255, 255)


def progress_plot(images: Sequence, result, *, title: str | None = None) -> Image.Image:
    """Progress of each input frame (line, dots sized by confidence) above the frames' thumbnails."""
    title = title or (f"progress ({result.engine}, {result.method}; confidence {result.confidence:.2f}"
                      + ("" if result.direction_known else "; direction is a guess") + ")")
    chart = _matplotlib_chart(result, title) if importlib.util.find_spec("matplotlib") else _pil_chart(result, title)
    strip = _strip(images, chart.width)
    out = Image.new("RGB", (chart.width, chart.height + strip.height), _BG)
    out.paste(chart, (0, 0))
    out.paste(strip, (0, chart.height))
    return out


def _matplotlib_chart(result, title: str) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(result.values)
    fig = Figure(figsize=(max(5.0, 0.45 * n + 1.5), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(n))
    ax.plot(xs, result.values, "-", color="#4C72B0", lw=1.2)
    ax.scatter(xs, result.values, s=[20 + 80 * c for c in result.frame_confidence], color="#4C72B0", zorder=3)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xticks(xs)
    ax.set_xlabel("input frame")
    ax.set_ylabel("progress")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _pil_chart(result, title: str) -> Image.Image:
    n = len(result.values)
    width, height, left, top, bottom = max(480, 40 * n + 80), 260, 50, 30, 40
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    font = _font(12)
    plot_w, plot_h = width - left - 20, height - top - bottom

    def point(i: int, v: float) -> tuple[float, float]:
        return left + plot_w * (i + 0.5) / n, top + plot_h * (1 - v)

    for v in (0.0, 0.5, 1.0):
        y = point(0, v)[1]
        draw.line((left, y, left + plot_w, y), fill=_GRID)
        draw.text((8, y - 7), f"{v:.1f}", font=font, fill=_INK)
    points = [point(i, v) for i, v in enumerate(result.values)]
    draw.line(points, fill=_LINE, width=2)
    for (x, y), c in zip(points, result.frame_confidence):
        r = 3 + 4 * c
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_LINE)
    for i in range(n):
        draw.text((point(i, 0)[0] - 4, top + plot_h + 8), str(i), font=font, fill=_INK)
    draw.text((left, 8), title, font=font, fill=_INK)
    return img


def _strip(images: Sequence, width: int) -> Image.Image:
    n = max(len(images), 1)
    thumb = max(16, min(_THUMB, width // n - 2))
    strip = Image.new("RGB", (width, thumb + 4), _BG)
    for i, frame in enumerate(images):
        small = ImageOps.contain(frame.convert("RGB"), (thumb, thumb), Image.Resampling.LANCZOS)
        strip.paste(small, (int((i + 0.5) * width / n - small.width / 2), 2))
    return strip


__all__ = ["progress_plot"]
