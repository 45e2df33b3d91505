"""Frame loading: every input kind, every bad input, natural order, the pixel budget, videos."""

from __future__ import annotations

import base64
import io
import logging
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tpru_agent import frames as F
from tpru_agent import sizing as S
from tpru_agent.errors import ConfigError, FrameError
from tpru_agent.frames import is_video, load_frame, load_frames
from tpru_agent.images import fingerprint
from tpru_agent.sizing import (
    PROCESSOR_MAX_PIXELS,
    PROCESSOR_MIN_PIXELS,
    TRAINED_FACTOR,
    TRAINED_MAX,
    TRAINED_MIN,
    PixelBudget,
    resize_to_budget,
)

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)
VIDEO_FPS, VIDEO_LEN = 10, 20  # brightness of frame i is 12 * i


def _png(path: Path, color=RED, size=(64, 48), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _video(path: Path, count: int = VIDEO_LEN, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, size)
    for i in range(count):
        writer.write(np.full((size[1], size[0], 3), 12 * i % 256, np.uint8))
    writer.release()
    return path


def _brightness(image: Image.Image) -> float:
    return float(np.asarray(image).mean())


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    a = {"root": root, "png": _png(root / "one.png"), "video": _video(root / "clip.mp4"),
         "short_video": _video(root / "short.avi", count=3)}
    for name, color in [("frame_10.png", BLUE), ("frame_2.png", GREEN), ("frame_1.png", RED), ("notes.txt", None)]:
        if color is None:
            (root / "seq" / name).write_text("not a frame")
        else:
            _png(root / "seq" / name, color)
    _png(root / "seq" / ".hidden.png", (0, 0, 0))
    for ext in ("jpg", "jpeg", "bmp", "webp", "tif", "tiff", "gif"):
        _png(root / "kinds" / f"img.{ext}", GREEN)
    _png(root / "kinds" / "rgba.png", (0, 0, 0, 0), mode="RGBA")
    _png(root / "kinds" / "gray.png", 128, mode="L")
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(root / "kinds" / "deep.png")
    return a


# ------------------------------------------------------------------------------------------------ good inputs

def _case_inputs(a):
    root, arr = a["root"], np.zeros((30, 40, 3), np.uint8)
    png_bytes = a["png"].read_bytes()
    return {
        "str path": (str(a["png"]), {}, 1),
        "Path": (a["png"], {}, 1),
        "file:// uri": ("file://" + str(a["png"]), {}, 1),
        "directory": (root / "seq", {}, 3),
        "glob": (str(root / "seq" / "frame_*.png"), {}, 3),
        "recursive glob": (str(root / "**" / "img.*"), {}, 7),
        "video": (a["video"], {}, 4),
        "video 7 frames": (a["video"], {"video_frames": 7}, 7),
        "video timestamps": (a["video"], {"timestamps": [0.0, 1.0]}, 2),
        "short video": (a["short_video"], {"video_frames": 8}, 3),
        "PIL": (Image.new("RGB", (50, 50)), {}, 1),
        "PIL RGBA": (Image.new("RGBA", (50, 50)), {}, 1),
        "array HxWx3": (arr, {}, 1),
        "array HxWx4": (np.zeros((30, 40, 4), np.uint8), {}, 1),
        "array HxW": (np.zeros((30, 40), np.uint8), {}, 1),
        "array HxWx1": (np.zeros((30, 40, 1), np.uint8), {}, 1),
        "array TxHxWx3": (np.zeros((5, 30, 40, 3), np.uint8), {}, 5),
        "bytes": (png_bytes, {}, 1),
        "data uri": ("data:image/png;base64," + base64.b64encode(png_bytes).decode(), {}, 1),
        "tuple": ((arr, arr), {}, 2),
        "generator": ((arr for _ in range(3)), {}, 3),
        "mixture": ([Image.new("RGB", (9, 9)), root / "seq", str(a["video"]), arr], {}, 1 + 3 + 4 + 1),
    }


GOOD = ["str path", "Path", "file:// uri", "directory", "glob", "recursive glob", "video", "video 7 frames",
        "video timestamps", "short video", "PIL", "PIL RGBA", "array HxWx3", "array HxWx4", "array HxW",
        "array HxWx1", "array TxHxWx3", "bytes", "data uri", "tuple", "generator", "mixture"]


def test_good_case_table_is_complete(assets):
    assert list(_case_inputs(assets)) == GOOD


@pytest.mark.parametrize("name", GOOD)
@pytest.mark.parametrize("budget", [S.TPRU_BUDGET, None], ids=["budget", "native"])
def test_every_input_kind_loads_as_rgb(assets, name, budget):
    source, kwargs, count = _case_inputs(assets)[name]
    out = load_frames(source, budget=budget, **kwargs)
    assert len(out) == count
    assert all(isinstance(f, Image.Image) and f.mode == "RGB" for f in out)
    if budget is not None:
        assert all(f.width % 28 == 0 and f.height % 28 == 0 for f in out)
        assert all(S.budget_size(*f.size) == f.size for f in out)   # at its served size: a fixed point
        assert all(TRAINED_MIN * 0.75 <= f.width * f.height <= TRAINED_MAX * 1.25 for f in out)


@pytest.mark.parametrize("name", ["jpg", "jpeg", "bmp", "webp", "tif", "tiff", "gif"])
def test_each_image_extension_keeps_its_colour(assets, name):
    out = load_frame(assets["root"] / "kinds" / f"img.{name}", budget=None)
    assert out.size == (64, 48)
    assert np.abs(np.asarray(out)[10, 10].astype(int) - GREEN).max() < 12


@pytest.mark.parametrize("name,expected", [("rgba.png", 255), ("gray.png", 128), ("deep.png", 255)])
def test_modes_convert_to_rgb(assets, name, expected):
    # Transparent pixels go on white, like qwen-vl-utils' to_rgb; 16-bit scales to 8-bit.
    out = load_frame(assets["root"] / "kinds" / name, budget=None)
    assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == (expected,) * 3


def test_directory_sorts_naturally_and_skips_hidden_and_non_images(assets):
    out = load_frames(assets["root"] / "seq", budget=None)
    assert [tuple(np.asarray(f)[0, 0]) for f in out] == [RED, GREEN, BLUE]


def test_list_expands_in_place_and_keeps_order(assets):
    red = Image.new("RGB", (20, 20), RED)
    out = load_frames([red, assets["root"] / "seq", red], budget=None)
    assert [tuple(np.asarray(f)[0, 0]) for f in out] == [RED, RED, GREEN, BLUE, RED]


@pytest.mark.parametrize("video_frames,expected", [(1, [0]), (2, [0, 19]), (4, [0, 6, 13, 19])])
def test_video_samples_evenly(assets, video_frames, expected):
    out = load_frames(assets["video"], budget=None, video_frames=video_frames)
    assert [_brightness(f) for f in out] == pytest.approx([12 * i for i in expected], abs=6)


@pytest.mark.parametrize("timestamps,expected", [([1.5, 0.0], [15, 0]), ([2.0], [19]), ([0.25, 0.25], [2, 2])])
def test_video_timestamps_pick_frames_in_given_order(assets, timestamps, expected):
    out = load_frames(assets["video"], budget=None, timestamps=timestamps)
    assert [_brightness(f) for f in out] == pytest.approx([12 * i for i in expected], abs=6)


@pytest.mark.parametrize("size", [(640, 480), (100, 100), (1920, 1080), (50, 2000), (28, 28), (193, 191),
                                  (4000, 28), (28, 5000), (1, 111), (3, 500), (224, 224), (112, 112)])
def test_budget_resize_is_the_authors_two_steps(size):
    """EasyR1's process_image (PIL, int sides) then the real Qwen2-VL processor at the checkpoint's own budget."""
    from transformers import Qwen2VLImageProcessor

    image = Image.new("RGB", size)
    w, h = size
    for bound, grow in ((TRAINED_MAX, False), (TRAINED_MIN, True)):   # the authors' two ifs, in their order
        if (w * h < bound) if grow else (w * h > bound):
            factor = math.sqrt(bound / (w * h))
            w, h = int(w * factor), int(h * factor)
            image = image.resize((w, h))
    processor = Qwen2VLImageProcessor(min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS)
    grid = processor(images=[image], return_tensors="np")["image_grid_thw"][0]
    expected = (int(grid[2]) * 14, int(grid[1]) * 14)
    out = resize_to_budget(Image.new("RGB", size))
    assert out.size == expected == S.budget_size(*size)
    assert out.width % 28 == 0 and out.height % 28 == 0
    if max(size) / min(size) < 10:   # (a 140:1 strip is not a fixed point of the authors' steps either)
        assert resize_to_budget(out) is out   # served size is a fixed point: no second resampling


@pytest.mark.parametrize("size,tokens", [((224, 224), 49), ((640, 480), 48), ((112, 112), 25)])
def test_budget_matches_the_papers_token_counts(size, tokens):
    w, h = S.budget_size(*size)
    assert (w // 28) * (h // 28) == tokens


def test_budget_none_keeps_size_and_custom_budget_applies():
    image = Image.new("RGB", (333, 111))
    assert load_frame(image, budget=None).size == (333, 111)
    out = load_frame(image, budget=PixelBudget(min_pixels=4096, max_pixels=8192, factor=32))
    # 333x111 -> 156x52 (PIL step into the budget) -> 160x64 (sides rounded to the factor)
    assert out.size == (160, 64)


def test_off_distribution_budget_warns_once(caplog):
    budget = PixelBudget(min_pixels=1024, max_pixels=500_000)
    with caplog.at_level(logging.WARNING, logger="tpru_agent.sizing"):
        load_frame(Image.new("RGB", (64, 64)), budget=budget)
        load_frame(Image.new("RGB", (64, 64)), budget=budget)
        load_frame(Image.new("RGB", (64, 64)))
    shifts = [r for r in caplog.records if "distribution shift" in r.getMessage()]
    assert len(shifts) == 1 and "500000" in shifts[0].getMessage()


@pytest.mark.parametrize("kwargs", [dict(min_pixels=0), dict(factor=-1), dict(min_pixels=9000, max_pixels=8000),
                                    dict(max_pixels=1.5), dict(min_pixels=100, max_pixels=500)])
def test_bad_budget_is_a_config_error(kwargs):
    with pytest.raises(ConfigError, match="PixelBudget"):
        PixelBudget(**kwargs)


@pytest.mark.parametrize("channels", [3, 4])
def test_bgr_flag_swaps_channels(channels):
    array = np.zeros((28, 28, channels), np.uint8)
    array[..., 0] = 255  # blue in OpenCV order
    if channels == 4:
        array[..., 3] = 255
    assert tuple(np.asarray(load_frame(array, budget=None, bgr=True))[0, 0]) == (0, 0, 255)
    assert tuple(np.asarray(load_frame(array, budget=None))[0, 0]) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.new("RGB", (60, 30)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_frame(tmp_path / "phone.jpg", budget=None).size == (30, 60)


def test_load_frame_single_and_index_in_errors(assets):
    assert load_frame(str(assets["root"] / "seq" / "frame_2*"), budget=None).size == (64, 48)
    with pytest.raises(FrameError, match=r"frame 5 of history .*is a video") as info:
        load_frame(assets["video"], index=5, what="history")
    assert info.value.index == 5
    with pytest.raises(FrameError, match="matches 3 files"):
        load_frame(assets["root"] / "seq")


def test_fingerprint_tracks_content():
    base = Image.new("RGB", (8, 8), RED)
    changed = base.copy()
    changed.putpixel((3, 3), GREEN)
    assert fingerprint(base) == fingerprint(base.copy())
    assert len({fingerprint(base), fingerprint(changed), fingerprint(base.convert("L")),
                fingerprint(Image.new("RGB", (4, 16), RED))}) == 4


@pytest.mark.parametrize("value,expected", [("a.mp4", True), (Path("b.MOV"), True), ("c.webm", True),
                                            ("d.mkv", True), ("e.avi", True), ("f.png", False), ("mp4", False),
                                            (None, False), (3, False)])
def test_is_video(value, expected):
    assert is_video(value) is expected


def test_budget_constants_are_the_authors_numbers():
    """The one place the numbers are written out: TPRU's EasyR1 budget and the Qwen2.5-VL processor's defaults."""
    assert (TRAINED_MIN, TRAINED_MAX, TRAINED_FACTOR) == (16384, 36864, 28)
    assert (PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS) == (4 * 28 * 28, 16384 * 28 * 28)
    assert (S.TPRU_BUDGET.min_pixels, S.TPRU_BUDGET.max_pixels, S.TPRU_BUDGET.factor) == (16384, 36864, 28)


def test_frames_still_exposes_the_sizing_names_callers_import():
    """Modules written before the split import these from tpru_agent.frames; they must be the sizing objects."""
    for name in ("PixelBudget", "TPRU_BUDGET", "BUDGET_FILE", "PROCESSOR_MIN_PIXELS", "PROCESSOR_MAX_PIXELS",
                 "TRAINED_MIN", "TRAINED_MAX", "TRAINED_FACTOR", "budget_size", "pil_step_size", "smart_resize",
                 "resize_to_budget", "serving_budget", "folder_budget"):
        assert getattr(F, name) is getattr(S, name), name
        assert name in F.__all__, name
    assert F.fingerprint is fingerprint


def test_import_does_not_load_torch():
    code = ("import sys, tpru_agent.frames, tpru_agent.sizing, tpru_agent.cli.sheet; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------- bad inputs

def _bad_cases(root: Path):
    """name -> (make(root) -> input, kwargs, index expected in the error, words expected in the message)."""
    def write(name, data):
        path = root / "bad" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def truncated():
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, "PNG")
        return write("cut.png", buffer.getvalue()[:400])

    ok = np.zeros((8, 8, 3), np.uint8)
    return {
        "missing file": (lambda: root / "nope.png", {}, 0, "no such file"),
        "missing in list": (lambda: [ok, ok, root / "nope.png"], {}, 2, "no such file"),
        "missing folder": (lambda: root / "nodir" / "x.png", {}, 0, "does not exist either"),
        "dir without images": (lambda: write("empty_dir/readme.txt", b"x").parent, {}, 0, "no images"),
        "dir with only a video": (lambda: _video(root / "bad" / "vid_dir" / "v.mp4", 2).parent, {}, 0,
                                  "pass the video file itself"),
        "empty glob": (lambda: str(root / "zzz*.png"), {}, 0, "glob matched no image"),
        "zero-byte file": (lambda: write("zero.png", b""), {}, 0, "empty (0 bytes)"),
        "truncated png": (truncated, {}, 0, "truncated or corrupt"),
        "text named png": (lambda: write("text.png", b"hello, not an image"), {}, 0, "not a readable image"),
        "video not a video": (lambda: write("fake.mp4", b"not a video at all"), {}, 0, "cannot be opened"),
        "zero-byte video": (lambda: write("zero.mp4", b""), {}, 0, "empty (0 bytes)"),
        "timestamp past end": (lambda: _video(root / "bad" / "v2.mp4", 10), {"timestamps": [3.0]}, 0,
                               "outside the video (0 to 1 s"),
        "negative timestamp": (lambda: _video(root / "bad" / "v3.mp4", 10), {"timestamps": [-1]}, 0, "outside"),
        "timestamps without video": (lambda: ok, {"timestamps": [1.0]}, None, "no input is a video"),
        "float array": (lambda: np.zeros((8, 8, 3), np.float32), {}, 0, "dtype is float32, expected uint8"),
        "two-channel array": (lambda: np.zeros((8, 8, 2), np.uint8), {}, 0, "not HxW, HxWx3 or HxWx4"),
        "channels-first array": (lambda: [ok, np.zeros((3, 8, 8), np.uint8)], {}, 1, "channels-first"),
        "empty array": (lambda: np.zeros((0, 8, 3), np.uint8), {}, 0, "no pixels"),
        "unsupported type": (lambda: [ok, 42], {}, 1, "unsupported frame type int"),
        "nested list": (lambda: [[ok]], {}, 0, "unsupported frame type list"),
        "url": (lambda: "https://example.com/a.png", {}, 0, "URLs are not fetched"),
        "bad data uri": (lambda: "data:image/png,abc", {}, 0, "base64"),
        "empty bytes": (lambda: b"", {}, 0, "empty"),
        "too few": (lambda: [ok, ok], {"min_frames": 4}, None, "got 2 frames; at least 4 frames allowed"),
        "too many": (lambda: [ok] * 5, {"min_frames": 2, "max_frames": 4}, None, "got 5 frames; between 2 and 4"),
        "exact count": (lambda: [ok] * 3, {"min_frames": 4, "max_frames": 4}, None, "got 3 frames; exactly 4 frames"),
        "bad timestamps": (lambda: ok, {"timestamps": ["soon"]}, None, "timestamps must be numbers"),
        "4-D array bad dtype": (lambda: np.zeros((2, 4, 4, 3), np.int64), {}, 0, "dtype is int64"),
        "empty list": (lambda: [], {}, None, "got 0 frames"),
        "aspect ratio": (lambda: np.zeros((1, 300), np.uint8), {}, 0, "crop it first"),
        "video_frames zero": (lambda: ok, {"video_frames": 0}, None, "video_frames must be a positive"),
    }


@pytest.mark.parametrize("name", list(_bad_cases(Path("/x"))))
def test_bad_input_raises_frame_error_naming_index_and_fix(tmp_path, name):
    make, kwargs, index, words = _bad_cases(tmp_path)[name]
    with pytest.raises(FrameError) as info:
        load_frames(make(), what="candidates", **kwargs)
    message = str(info.value)
    assert words in message
    assert info.value.index == index
    assert "candidates" in message
    if index is not None:
        assert message.startswith(f"frame {index} of candidates")


def test_decompression_bomb_is_capped(tmp_path, monkeypatch):
    path = _png(tmp_path / "big.png", size=(200, 200))
    monkeypatch.setattr(F, "MAX_FRAME_PIXELS", 10_000)
    with pytest.raises(FrameError, match=r"over the 0.01 Mpx cap .*MAX_FRAME_PIXELS") as info:
        load_frames([path])
    assert info.value.source == str(path)
    monkeypatch.setattr(F, "MAX_FRAME_PIXELS", 50_000_000)
    assert load_frame(path, budget=None).size == (200, 200)


def test_pil_decompression_bomb_error_becomes_frame_error(tmp_path, monkeypatch):
    path = _png(tmp_path / "bomb.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's hard limit is twice this
    with pytest.raises(FrameError, match="too large to decode safely"):
        load_frame(path)


def test_video_seeking_matches_sequential_decode(tmp_path, monkeypatch):
    from tpru_agent import video as V

    path = _video(tmp_path / "long.mp4", count=120, size=(32, 32))  # gaps of ~60 frames: seeks
    seeking = [np.asarray(f) for f in load_frames(path, budget=None, video_frames=3)]
    monkeypatch.setattr(V, "_SEEK_GAP", 10**9)  # decode every frame in one pass
    sequential = [np.asarray(f) for f in load_frames(path, budget=None, video_frames=3)]
    assert len(seeking) == len(sequential) == 3
    assert all(np.array_equal(a, b) for a, b in zip(seeking, sequential))
    assert [float(a.mean()) for a in seeking] == pytest.approx([0, 12 * 60 % 256, 12 * 119 % 256], abs=8)


def test_expand_sources_names_each_loaded_frame(assets):
    from tpru_agent.frames import expand_sources

    stack = np.zeros((2, 8, 8, 3), np.uint8)
    inputs = [assets["png"], assets["root"] / "seq", assets["video"], stack, Image.new("RGB", (9, 9))]
    names = expand_sources(inputs, video_frames=3)
    assert len(names) == len(load_frames(inputs, budget=None, video_frames=3)) == 1 + 3 + 3 + 2 + 1
    assert [Path(n).name for n in names[1:4]] == ["frame_1.png", "frame_2.png", "frame_10.png"]
    assert [Path(n).name for n in names[4:7]] == ["clip.mp4@0.00s", "clip.mp4@1.00s", "clip.mp4@1.90s"]
    assert names[7].startswith("array (2, 8, 8, 3)[0]") and names[9] == "PIL RGB 9x9"
    assert expand_sources(assets["video"], timestamps=[0.5]) == [f"{assets['video']}@0.50s"]
    with pytest.raises(FrameError, match="frame 1 .*no such file"):
        expand_sources([assets["png"], assets["root"] / "missing.png"])


def test_smart_resize_matches_the_qwen2_vl_processor_over_a_grid():
    """The torch-free arithmetic in sizing.smart_resize equals the processor's own function (no drift)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as theirs

    from tpru_agent.sizing import smart_resize

    patch = TRAINED_FACTOR * TRAINED_FACTOR
    for bounds in ((PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS), (TRAINED_MIN, TRAINED_MAX), (4 * patch, 1280 * patch)):
        for h in (10, 14, 28, 57, 100, 141, 168, 240, 480, 721, 1080, 2160):
            for w in (10, 14, 28, 63, 100, 190, 224, 320, 640, 1280, 1920, 3840):
                if max(h, w) / min(h, w) > 200:
                    continue
                assert smart_resize(h, w, 28, *bounds) == tuple(theirs(h, w, 28, *bounds)), (h, w, bounds)


def test_resizing_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from PIL import Image; from tpru_agent.frames import load_frames; "
            "load_frames([Image.new('RGB', (640, 480))] * 2); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
