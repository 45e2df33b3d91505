"""Video decoding: PyAV first (AV1, h264, VP9), OpenCV as the fallback; frames land at the right indices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tpru_agent import video as V
from tpru_agent.errors import FrameError
from tpru_agent.frames import load_frames

av = pytest.importorskip("av")

CODECS = {"av1": ("libsvtav1", ".mp4"), "h264": ("libx264", ".mp4"), "vp9": ("libvpx-vp9", ".webm")}


def encode(path: Path, codec: str, count: int = 30, fps: int = 10, size=(64, 48)) -> Path:
    """A clip whose frame k is a flat grey of level 8 * (k % 32) (so a decoded frame tells its index)."""
    encoder = CODECS[codec][0]
    if encoder not in av.codecs_available:
        pytest.skip(f"PyAV here has no {encoder} encoder")
    with av.open(str(path), "w") as out:
        stream = out.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if codec == "av1":
            stream.options = {"preset": "12"}
        for k in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 8 * (k % 32), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def levels(images) -> list[int]:
    return [round(float(np.asarray(im).mean()) / 8) for im in images]


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_every_codec_reads_evenly_spaced_frames(tmp_path, codec):
    clip = encode(tmp_path / f"clip{CODECS[codec][1]}", codec)
    assert levels(V.read_video(clip, video_frames=4)) == [0, 10, 19, 29]
    labels, images = V.read_labelled(clip, timestamps=[2.5, 0.0])
    assert levels(images) == [25, 0] and [lb.rsplit("@", 1)[1] for lb in labels] == ["2.50s", "0.00s"]
    assert V.video_labels(clip, video_frames=2) == [f"{clip}@0.00s", f"{clip}@2.90s"]


def test_av1_is_read_although_opencv_cannot(tmp_path, monkeypatch):
    """LeRobot writes AV1 by default; OpenCV's FFmpeg here has no AV1 decoder, PyAV's libdav1d has."""
    clip = encode(tmp_path / "lerobot.mp4", "av1")
    assert len(load_frames(clip, budget=None, video_frames=5)) == 5
    monkeypatch.setattr(V, "_have_pyav", lambda: False)
    try:
        frames = load_frames(clip, budget=None, video_frames=5)
    except FrameError as exc:  # OpenCV without AV1: the error says that PyAV is what reads it
        assert "PyAV is not installed" in str(exc)
    else:
        assert levels(frames) == [0, 7, 14, 22, 29]


def test_opencv_fallback_reads_h264_without_pyav(tmp_path, monkeypatch):
    clip = encode(tmp_path / "clip.mp4", "h264")
    monkeypatch.setattr(V, "_have_pyav", lambda: False)
    assert levels(V.read_video(clip, video_frames=3)) == [0, 14, 29]


def test_seeking_over_long_gaps_matches_one_pass(tmp_path, monkeypatch):
    clip = encode(tmp_path / "long.mp4", "h264", count=200, fps=25)
    seeking = V.read_video(clip, video_frames=4)
    monkeypatch.setattr(V, "_SEEK_GAP", 10**9)
    assert levels(seeking) == levels(V.read_video(clip, video_frames=4)) == [k % 32 for k in (0, 66, 133, 199)]


def test_a_file_pyav_cannot_open_falls_back_and_fails_with_both_reasons(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(FrameError, match=r"cannot be opened.*PyAV: cannot open the file"):
        V.read_video(bad)


def test_cli_order_takes_video_frames(tmp_path):
    from click.testing import CliRunner

    from tpru_agent.cli.main import cli

    clip = encode(tmp_path / "clip.mp4", "av1")
    result = CliRunner().invoke(cli, ["order", str(clip), "--video-frames", "6", "--model", "classic", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    names = json.loads(result.stdout)["frames"]
    assert len(names) == 6 and names[0].endswith("@0.00s") and names[-1].endswith("@2.90s")


def _reencode_av1(path: Path) -> None:
    """Rewrite a video as AV1 in place (as LeRobot 0.4's default codec writes it)."""
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("PyAV here has no libsvtav1 encoder")
    with av.open(str(path)) as src:
        frames = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
        fps = src.streams.video[0].average_rate
    tmp = path.with_name("av1-" + path.name)
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libsvtav1", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "12"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)


def test_lerobot_v3_dataset_in_av1_yields_every_episode(tmp_path):
    from episode_data import decode, same_color, write_lerobot

    from tpru_agent.finetune.sources.lerobot import lerobot_episodes

    episodes = [{"color": (220, 40, 40), "frames": 12, "task": "pick"},
                {"color": (40, 40, 220), "frames": 9, "task": "place"}]
    write_lerobot(tmp_path / "ds", "v3.0", episodes, {"observation.images.front": "video"})
    for video in (tmp_path / "ds" / "videos").rglob("*.mp4"):
        _reencode_av1(video)
    skips = []
    eps = list(lerobot_episodes(tmp_path / "ds", frames=5, on_skip=lambda e, r: skips.append(r)))
    assert not skips and len(eps) == 2
    for ep, src in zip(eps, episodes):
        decoded = [decode(f, src["frames"]) for f in ep.frames]
        assert all(same_color(c, src["color"], tol=40) for c, _ in decoded), decoded
        assert [i for _, i in decoded] == sorted(i for _, i in decoded)


def test_a_corrupt_video_is_one_line_in_the_cli(tmp_path):
    """FFmpeg's own log line ("moov atom not found") stays off the terminal: the CLI says one line."""
    import os
    import random
    import subprocess
    import sys

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 200)  # a header, no moov atom
    env = {k: v for k, v in os.environ.items() if k not in ("OPENCV_FFMPEG_LOGLEVEL", "OPENCV_LOG_LEVEL")}
    noise = tmp_path / "noise.mp4"  # these 300 bytes made OpenCV's own logger warn ("Unable to read codec ...")
    noise.write_bytes(random.Random(2).randbytes(300))
    for video in (bad, noise):
        done = subprocess.run([sys.executable, "-m", "tpru_agent.cli.main", "order", str(video), "--model",
                               "classic"], capture_output=True, text=True, env=env, timeout=120)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), done.stderr
