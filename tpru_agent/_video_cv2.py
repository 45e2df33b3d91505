"""The OpenCV fallback of :mod:`tpru_agent.video` (PyAV decodes first; OpenCV covers a machine without it)."""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from tpru_agent.video import REENCODE, pick_indices

log = logging.getLogger(__name__)

#: Gaps up to this many frames are walked with grab() instead of a seek (cheaper, and exact for every codec).
_GRAB_GAP = 32


def _open(path):
    """``cv2.VideoCapture`` of ``path``, with FFmpeg's own log lines (e.g. "moov atom not found") kept off the
    terminal: the caller raises one error naming the file and the fix instead. A level set by the user wins."""
    import cv2

    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read when the FFmpeg backend opens
    if "OPENCV_LOG_LEVEL" not in os.environ:  # OpenCV's own "Unable to read codec parameters" warnings too
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    return cv2.VideoCapture(os.fspath(path))


def probe(path, make_error) -> tuple[int, float]:
    """(frame count, fps) from the container header, counting by decoding when it does not say."""
    capture = _open(path)
    try:
        return _header(capture, path, make_error)
    finally:
        capture.release()


def read(path, video_frames: int, timestamps, make_error) -> tuple[list[int], float, list[Image.Image]]:
    """(frame indices, fps, RGB frames) of the frames :func:`tpru_agent.video.pick_indices` chooses."""
    import cv2

    capture = _open(path)
    try:
        count, fps = _header(capture, path, make_error)
        wanted = pick_indices(count, fps, video_frames, timestamps, make_error)
        frames = _read_seeking(capture, sorted(set(wanted)))
    finally:
        capture.release()
    if frames is None:  # the header over-counts (common at the tail): count by decoding, then read in one pass
        true_count = _count_frames(path)
        log.debug("%s: header says %d frames, %d decode; re-reading sequentially", path, count, true_count)
        wanted = pick_indices(true_count, fps, video_frames, timestamps, make_error)
        frames = _read_sequential(path, set(wanted))
        missing = sorted(set(wanted) - set(frames))
        if missing:
            raise make_error(f"video frames {missing[:5]} cannot be decoded; {REENCODE}")
    return wanted, fps, [Image.fromarray(cv2.cvtColor(frames[k], cv2.COLOR_BGR2RGB)) for k in wanted]


def _header(capture, path, make_error) -> tuple[int, float]:
    """(frame count, fps) of an opened capture; counts by decoding when the container does not say."""
    import cv2

    if not capture.isOpened():
        raise make_error(f"video cannot be opened (empty, corrupt or unknown codec); {REENCODE}")
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    if count <= 0:  # some containers do not store the frame count
        count = _count_frames(path)
    return count, fps


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
    capture = _open(path)
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
    capture = _open(path)
    count = 0
    try:
        while capture.grab():
            count += 1
    finally:
        capture.release()
    return count
