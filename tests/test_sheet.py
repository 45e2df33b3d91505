"""Contact sheets and the atomic image writer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tpru_agent.cli.sheet import contact_sheet, default_columns, save_image
from tpru_agent.errors import ConfigError, FrameError


def _frames(count: int, size=(160, 120)):
    return [Image.new("RGB", size, (40 * k % 256, 90, 200 - 20 * k % 200)) for k in range(count)]


def _labels(count: int):
    return [chr(ord("A") + k) for k in range(count)]


@pytest.mark.parametrize("count,columns,grid", [(1, None, (1, 1)), (4, None, (4, 1)), (7, None, (4, 2)),
                                                (9, 3, (3, 3)), (3, 10, (3, 1)), (20, None, (5, 4))])
def test_sheet_grid_size(count, columns, grid):
    thumb = 96
    plain = contact_sheet(_frames(count), _labels(count), columns=columns, thumb=thumb)
    cols, rows = grid
    assert plain.mode == "RGB"
    assert plain.width == 8 + cols * (thumb + 8)
    # Each row: a label band, the thumbnail, the padding; height grows linearly with the rows.
    one_row = contact_sheet(_frames(cols), _labels(cols), columns=cols, thumb=thumb)
    assert plain.height - 8 == rows * (one_row.height - 8)


def test_title_and_captions_add_height():
    frames, labels = _frames(4), _labels(4)
    plain = contact_sheet(frames, labels)
    titled = contact_sheet(frames, labels, title="order: CABD")
    captioned = contact_sheet(frames, labels, captions=["step one", "two", "three", "four"])
    assert titled.width == plain.width == captioned.width
    assert titled.height > plain.height and captioned.height > plain.height


def test_labels_and_captions_change_pixels():
    frames = _frames(2)
    first = np.asarray(contact_sheet(frames, ["A", "B"]))
    swapped = np.asarray(contact_sheet(frames, ["B", "A"]))
    assert first.shape == swapped.shape and (first != swapped).any()
    one = np.asarray(contact_sheet(frames, ["A", "B"], captions=["x", "y"]))
    two = np.asarray(contact_sheet(frames, ["A", "B"], captions=["pour water", "y"]))
    assert (one != two).any()
    # Thumbnails are pasted: the frame colour appears in the sheet.
    assert (first.reshape(-1, 3) == np.asarray(frames[0])[0, 0]).all(axis=1).sum() > 1000


def test_long_text_is_cut_not_overflowing():
    sheet = contact_sheet(_frames(2), ["a very long label " * 5, "B"], title="T " * 200,
                          captions=["word " * 80, "short"], thumb=64)
    assert sheet.width == 8 + 2 * (64 + 8)


def test_sheet_accepts_arrays_and_keeps_aspect():
    wide = np.zeros((50, 200, 3), np.uint8)
    sheet = np.asarray(contact_sheet([wide], ["A"], thumb=100))
    # 200x50 fits the 100 px box as 100x25: black rows exist, cell grey remains above and below.
    assert (sheet == 0).all(axis=2).sum() == pytest.approx(100 * 25, rel=0.05)


@pytest.mark.parametrize("kwargs,words", [
    (dict(labels=["A"]), "2 images but 1 labels"),
    (dict(labels=["A", "B"], captions=["x"]), "1 captions"),
    (dict(labels=["A", "B"], thumb=10), "thumb must be"),
    (dict(labels=["A", "B"], columns=0), "columns must be"),
])
def test_sheet_bad_arguments(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        contact_sheet(_frames(2), **kwargs)


def test_sheet_bad_image_is_frame_error():
    with pytest.raises(FrameError, match="frame 1 of sheet images"):
        contact_sheet([_frames(1)[0], "missing.png"], ["A", "B"])


def test_default_columns():
    assert [default_columns(n) for n in (1, 4, 6, 7, 16, 30)] == [1, 4, 6, 4, 4, 6]


@pytest.mark.parametrize("name", ["sheet.png", "sheet.jpg", "sheet.webp"])
def test_save_image_atomic_creates_parents(tmp_path, name):
    image = Image.new("RGBA", (30, 20), (10, 200, 30, 255))
    out = save_image(image, tmp_path / "a" / "b" / name)
    assert out == tmp_path / "a" / "b" / name
    assert sorted(p.name for p in out.parent.iterdir()) == [name]  # no temporary left behind
    with Image.open(out) as back:
        assert back.size == (30, 20)
        assert np.abs(np.asarray(back.convert("RGB"))[5, 5].astype(int) - (10, 200, 30)).max() < 10


def test_save_image_replaces_existing_and_rejects_unknown_extension(tmp_path):
    path = tmp_path / "s.png"
    save_image(Image.new("RGB", (5, 5)), path)
    save_image(Image.new("RGB", (7, 3)), path)
    with Image.open(path) as back:
        assert back.size == (7, 3)
    with pytest.raises(ConfigError, match="extension '.xyz'"):
        save_image(Image.new("RGB", (5, 5)), tmp_path / "s.xyz")
    assert not (tmp_path / "s.xyz").exists()


def test_sheet_png_roundtrip(tmp_path):
    sheet = contact_sheet(_frames(7), _labels(7), title="next frame after step 2",
                          captions=[f"frame_{k}.png" for k in range(7)])
    path = save_image(sheet, tmp_path / "sheet.png")
    with Image.open(path) as back:
        assert back.size == sheet.size and np.array_equal(np.asarray(back), np.asarray(sheet))
