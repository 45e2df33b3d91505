"""Frames out of a video file: evenly sampled, or at given times. Used by :mod:`tpru_agent.frames`.

PyAV decodes first (FFmpeg with libdav1d: AV1, which LeRobot writes by default, as well as h264 and VP9);
OpenCV is the fallback when PyAV is missing or cannot read a file. OpenCV's own FFmpeg often lacks an AV1
decoder, so an AV1 file read through OpenCV alone yields no frames.

Example:
    >>> from tpru_agent.video import read_video
    >>> [f.size for f in read_video("clip.mp4", video_frames=2)]   # doctest: +SKIP
    [(640, 480), (640, 480)]
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from tpru_agent.errors import FrameError

log = logging.getLogger(__name__)

REENCODE = "re-encode it, e.g. ffmpeg -i in.webm -c:v libx264 out.mp4"
#: A wanted frame further than this past the decoder's position is reached by a seek (to the keyframe before it).
_SEEK_GAP = 48


class _Unreadable(Exception):
    """PyAV cannot read the file; the OpenCV fallback is tried next."""


def read_video(path, *, video_frames: int = 4, timestamps: Sequence[float] | None = None,
               error: Callable[[str], FrameError] | None = None) -> list[Image.Image]:
    """Read RGB frames from a video.

    Args:
        path: the video file.
        video_frames: how many frames to take, spread evenly from the first to the last (fewer, all distinct,
            when the video is shorter).
        timestamps: seconds at which to take a frame, in the order given; replaces ``video_frames``.
        error: builds the exception for a message (lets the caller add the frame index); defaults to FrameError.

    Returns:
        The frames as RGB PIL images.

    Raises:
        FrameError: the video cannot be opened, has no frames, has no frame rate (with timestamps), or a
            timestamp lies outside it.
    """
    return read_labelled(path, video_frames=video_frames, timestamps=timestamps, error=error)[1]


def read_labelled(path, *, video_frames: int = 4, timestamps: Sequence[float] | None = None,
                  error: Callable[[str], FrameError] | None = None) -> tuple[list[str], list[Image.Image]]:
    """Like :func:`read_video`, plus one label per frame (``"clip.mp4@1.50s"``, see :func:`video_labels`)."""
    make_error = error or (lambda message: FrameError(message, source=os.fspath(path)))
    why = "PyAV is not installed (pip install av)"
    if _have_pyav():
        try:
            wanted, fps, images = _pyav_read(path, video_frames, timestamps, make_error)
            return _labels(path, wanted, fps), images
        except _Unreadable as exc:
            why = f"PyAV: {exc}"
            log.debug("%s: %s; trying OpenCV", path, why)
    from tpru_agent import _video_cv2

    wanted, fps, images = _video_cv2.read(path, video_frames, timestamps, _with_reason(make_error, why))
    return _labels(path, wanted, fps), images


def video_labels(path, *, video_frames: int = 4, timestamps: Sequence[float] | None = None,
                 error: Callable[[str], FrameError] | None = None) -> list[str]:
    """One label per frame :func:`read_video` returns (``"clip.mp4@1.50s"``), from the header alone (no decoding).

    Example:
        >>> video_labels("clip.mp4", video_frames=2)   # doctest: +SKIP
        ['clip.mp4@0.00s', 'clip.mp4@1.90s']
    """
    make_error = error or (lambda message: FrameError(message, source=os.fspath(path)))
    why = "PyAV is not installed (pip install av)"
    count = fps = None
    if _have_pyav():
        try:
            count, fps = _pyav_probe(path)
        except _Unreadable as exc:
            why = f"PyAV: {exc}"
    if count is None:
        from tpru_agent import _video_cv2

        count, fps = _video_cv2.probe(path, _with_reason(make_error, why))
    return _labels(path, pick_indices(count, fps, video_frames, timestamps, make_error), fps)


def pick_indices(count: int, fps: float, video_frames: int, timestamps, make_error) -> list[int]:
    """Frame indices to read, in output order."""
    if count <= 0:
        raise make_error(f"video has no decodable frames; {REENCODE}")
    if timestamps is None:
        picked = np.linspace(0, count - 1, video_frames).round().astype(int).tolist()
        unique = sorted(set(picked))
        if len(unique) < video_frames:
            log.debug("video has %d frames; returning %d distinct frames instead of %d", count, len(unique),
                      video_frames)
        return unique
    if fps <= 0 or not np.isfinite(fps):
        raise make_error("video reports no frame rate, so timestamps cannot be placed; use video_frames instead")
    duration = count / fps
    indices = []
    for t in timestamps:
        if not (0 <= t <= duration):
            raise make_error(
                f"timestamp {t:g} s is outside the video (0 to {duration:.3g} s: {count} frames at {fps:g} fps); "
                "pick times within it"
            )
        indices.append(min(int(t * fps + 1e-6), count - 1))
    return indices


def _labels(path, indices: list[int], fps: float) -> list[str]:
    name = os.fspath(path)
    if fps > 0 and np.isfinite(fps):
        return [f"{name}@{k / fps:.2f}s" for k in indices]
    return [f"{name}#{k}" for k in indices]


def _with_reason(make_error, why: str):
    """The OpenCV fallback's errors also say why PyAV did not read the file."""
    return lambda message: make_error(f"{message} ({why})")


def _have_pyav() -> bool:
    return importlib.util.find_spec("av") is not None


def _open(path):
    import av

    try:
        container = av.open(os.fspath(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise _Unreadable(f"cannot open the file ({type(exc).__name__}: {exc})") from exc
    if not container.streams.video:
        container.close()
        raise _Unreadable("the file holds no video stream")
    return container


def _rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _pyav_probe(path) -> tuple[int, float]:
    """(frame count, fps): the count from the header, else from the packets (demuxed, not decoded)."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        count = int(stream.frames or 0)
        if count <= 0:  # webm / mkv do not store it
            count = sum(1 for packet in container.demux(stream) if packet.size)
        return count, _rate(stream)
    except av.error.FFmpegError as exc:
        raise _Unreadable(f"cannot read the packets ({exc})") from exc
    finally:
        container.close()


def _pyav_read(path, video_frames: int, timestamps, make_error) -> tuple[list[int], float, list[Image.Image]]:
    """(frame indices, fps, RGB frames) decoded with PyAV."""
    count, fps = _pyav_probe(path)
    wanted = pick_indices(count, fps, video_frames, timestamps, make_error)
    frames = _pyav_decode(path, sorted(set(wanted)), fps)
    missing = sorted(set(wanted) - set(frames))
    if missing:  # the header over-counts (common at the tail): count by decoding, then pick again
        true_count = len(_pyav_decode(path, None, fps))
        log.debug("%s: header says %d frames, %d decode", path, count, true_count)
        wanted = pick_indices(true_count, fps, video_frames, timestamps, make_error)
        frames = _pyav_decode(path, sorted(set(wanted)), fps)
        missing = sorted(set(wanted) - set(frames))
        if missing:
            raise _Unreadable(f"video frames {missing[:5]} cannot be decoded")
    return wanted, fps, [frames[k] for k in wanted]


def _pyav_decode(path, indices: list[int] | None, fps: float) -> dict[int, Image.Image | None]:
    """The frames at ``indices`` (sorted) by index; ``None`` decodes every frame and keeps none (a count)."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return _walk(container, stream, indices, fps)
    except av.error.FFmpegError as exc:
        raise _Unreadable(f"decoding failed ({exc})") from exc
    finally:
        container.close()


def _walk(container, stream, indices: list[int] | None, fps: float) -> dict[int, Image.Image | None]:
    """Decode forward, seeking over long gaps; a frame's index comes from its time stamp (its position without)."""
    start = stream.start_time or 0
    base = stream.time_base
    seekable = fps > 0 and base is not None
    wanted = set(indices or [])
    out: dict[int, Image.Image | None] = {}
    frames, position = None, -1
    for target in (indices if indices is not None else [None]):
        if target is not None and target in out:
            continue
        if frames is None or (seekable and target is not None and target - position > _SEEK_GAP):
            if frames is not None or (seekable and target is not None and target > _SEEK_GAP):
                container.seek(start + int(max(target - 1, 0) / fps / base), stream=stream, backward=True, any_frame=False)
                position = None  # unknown until a frame with a time stamp arrives
            frames = container.decode(stream)
        for frame in frames:
            if seekable and frame.pts is not None:
                position = round(float((frame.pts - start) * base) * fps)
            elif position is None:
                raise _Unreadable("frames without time stamps after a seek")
            else:
                position += 1
            if indices is None:
                out[position] = None
            elif position in wanted:
                out[position] = frame.to_image()
            if target is not None and position >= target:
                break
    return out
