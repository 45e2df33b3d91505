"""Frames out of a video file with OpenCV: evenly sampled, or at given times. Used by :mod:`tpru_agent.frames`.

Example:
    >>> from tpru_agent.video import read_video
    >>> [f.size for f in read_video("clip.mp4", video_frames=2)]   # doctest: +SKIP
    [(640, 480), (640, 480)]
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .errors import FrameError

log = logging.getLogger(__name__)

#: Gaps up to this many frames are walked with grab() instead of a seek (cheaper, and exact for every codec).
_GRAB_GAP = 32
_REENCODE = "re-encode it, e.g. ffmpeg -i in.webm -c:v libx264 out.mp4"


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
    import cv2  # imported here: ~0.1 s, and only videos need it

    make_error = error or (lambda message: FrameError(message, source=os.fspath(path)))
    capture = cv2.VideoCapture(os.fspath(path))
    try:
        count, fps = _header(capture, path, make_error)
        wanted = _pick(count, fps, video_frames, timestamps, make_error)
        frames = _read_seeking(capture, sorted(set(wanted)))
    finally:
        capture.release()
    if frames is None:  # the header over-counts (common at the tail): count by decoding, then read in one pass
        true_count = _count_frames(path)
        log.debug("%s: header says %d frames, %d decode; re-reading sequentially", path, count, true_count)
        wanted = _pick(true_count, fps, video_frames, timestamps, make_error)
        frames = _read_sequential(path, set(wanted))
        missing = sorted(set(wanted) - set(frames))
        if missing:
            raise make_error(f"video frames {missing[:5]} cannot be decoded; {_REENCODE}")
    images = [Image.fromarray(cv2.cvtColor(frames[k], cv2.COLOR_BGR2RGB)) for k in wanted]
    return _labels(path, wanted, fps), images


def video_labels(path, *, video_frames: int = 4, timestamps: Sequence[float] | None = None,
                 error: Callable[[str], FrameError] | None = None) -> list[str]:
    """One label per frame :func:`read_video` returns (``"clip.mp4@1.50s"``), from the header alone (no decoding).

    Example:
        >>> video_labels("clip.mp4", video_frames=2)   # doctest: +SKIP
        ['clip.mp4@0.00s', 'clip.mp4@1.90s']
    """
    import cv2

    make_error = error or (lambda message: FrameError(message, source=os.fspath(path)))
    capture = cv2.VideoCapture(os.fspath(path))
    try:
        count, fps = _header(capture, path, make_error)
    finally:
        capture.release()
    return _labels(path, _pick(count, fps, video_frames, timestamps, make_error), fps)


def _labels(path, indices: list[int], fps: float) -> list[str]:
    name = os.fspath(path)
    if fps > 0 and np.isfinite(fps):
        return [f"{name}@{k / fps:.2f}s" for k in indices]
    return [f"{name}#{k}" for k in indices]


def _header(capture, path, make_error) -> tuple[int, float]:
    """(frame count, fps) of an opened capture; counts by decoding when the container does not say."""
    import cv2

    if not capture.isOpened():
        raise make_error(f"video cannot be opened (empty, corrupt or unknown codec); {_REENCODE}")
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    if count <= 0:  # some containers do not store the frame count
        count = _count_frames(path)
    return count, fps


def _pick(count: int, fps: float, video_frames: int, timestamps, make_error) -> list[int]:
    """Frame indices to read, in output order."""
    if count <= 0:
        raise make_error(f"video has no decodable frames; {_REENCODE}")
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


def _read_seeking(capture, indices: list[int]) -> dict[int, np.ndarray] | None:
    """Read the given (sorted) frames, seeking over long gaps; None if any read fails."""
    import cv2

    frames, position = {}, 0
    for index in indices:
        gap = index - position
        if 0 <= gap <= _GRAB_GAP:
            for _ in range(gap):
                if not capture.grab():
                    return None
        else:
            capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = capture.read()
        if not ok or frame is None:
            return None
        frames[index] = frame
        position = index + 1
    return frames


def _read_sequential(path, wanted: set[int]) -> dict[int, np.ndarray]:
    import cv2

    capture = cv2.VideoCapture(os.fspath(path))
    frames, index = {}, 0
    try:
        last = max(wanted)
        while index <= last and capture.grab():
            if index in wanted:
                ok, frame = capture.retrieve()
                if ok:
                    frames[index] = frame
            index += 1
    finally:
        capture.release()
    return frames


def _count_frames(path) -> int:
    import cv2

    capture = cv2.VideoCapture(os.fspath(path))
    count = 0
    try:
        while capture.grab():
            count += 1
    finally:
        capture.release()
    return count
