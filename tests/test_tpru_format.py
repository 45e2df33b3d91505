"""The TPRU parquet layout: round trips, determinism, Hugging Face decoding, foreign files, the pixel budget."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tpru_agent.errors import ConfigError, FrameError
from tpru_agent.finetune.data.features import budget_size, fit_budget
from tpru_agent.finetune.data.tpru_format import (
    TPRURow,
    content_hash,
    encode_png,
    read_parquet,
    sample_rows,
    summarize,
    write_parquet,
)


def _png(color, size=(56, 84)) -> bytes:
    return encode_png(Image.new("RGB", size, color))


def _rows() -> list[TPRURow]:
    return [
        TPRURow("Image A: <image>\nImage B: <image>\nOrder?", (_png("red"), _png("blue")), "BA", task="ordering",
                domain="robot", episode_id="ep1", names=("ep1#0.png", "ep1#3.png")),
        TPRURow("Step 1: <image>\nA. <image>\nB. None of the choices provided", (_png("green"), _png("white")), "B",
                task="next", domain="gui", negative=True, episode_id="ep2"),
    ]


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "part.parquet"
    assert write_parquet(_rows(), path) == 2
    back = list(read_parquet(path))
    assert [r.answer for r in back] == ["BA", "B"]
    assert [r.task for r in back] == ["ordering", "next"]
    assert [r.negative for r in back] == [False, True]
    assert back[0].names == ("ep1#0.png", "ep1#3.png")
    assert back[1].names == (None, None)
    assert back[0].images[1] == _png("blue")
    assert back[0].decoded()[1].getpixel((0, 0)) == (0, 0, 255)


def test_writes_are_deterministic_and_atomic(tmp_path):
    a, b = tmp_path / "a" / "x.parquet", tmp_path / "b" / "x.parquet"
    write_parquet(_rows(), a)
    write_parquet(_rows(), b)
    assert a.read_bytes() == b.read_bytes()
    assert content_hash([a], a.parent) == content_hash([b], b.parent)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    write_parquet(_rows()[:1], b)
    assert content_hash([a], a.parent) != content_hash([b], b.parent)


def test_hugging_face_datasets_decodes_the_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    write_parquet(_rows(), tmp_path / "train" / "part-00000.parquet")
    ds = datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "train" / "*.parquet")},
                               cache_dir=str(tmp_path / "cache"))["train"]
    row = ds[0]
    assert isinstance(row["images"][0], Image.Image)
    assert row["images"][0].size == (56, 84)
    assert row["problem"].count("<image>") == len(row["images"]) == 2
    assert ds.features["negative"].dtype == "bool"


@pytest.mark.parametrize("problem, n_images", [("A <image> B <image>", 1), ("no placeholder", 1), ("<image>", 0)])
def test_placeholder_count_must_match_images(tmp_path, problem, n_images):
    row = TPRURow(problem, tuple(_png("red") for _ in range(n_images)), "A")
    with pytest.raises(ConfigError, match="placeholders"):
        write_parquet([row], tmp_path / "x.parquet")


def test_reads_the_authors_layout_with_path_only_images(tmp_path):
    Image.new("RGB", (30, 40), "yellow").save(tmp_path / "img0.png")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"problem": ["<image> which?"], "images": [[{"bytes": None, "path": "img0.png"}]],
                      "answer": [" C "]}, schema=pa.schema([("problem", pa.string()), ("images", pa.list_(struct)),
                                                             ("answer", pa.string())]))
    pq.write_table(table, tmp_path / "tpru_test.parquet")
    (row,) = read_parquet(tmp_path / "tpru_test.parquet")
    assert row.answer == "C" and row.task == "" and row.domain == "" and row.negative is False
    assert row.decoded()[0].size == (30, 40)


def test_missing_columns_and_bad_images_are_clear_errors(tmp_path):
    pq.write_table(pa.table({"question": ["x"], "answer": ["A"]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="missing column"):
        list(read_parquet(tmp_path / "bad.parquet"))
    with pytest.raises(ConfigError, match="does not exist"):
        list(read_parquet(tmp_path / "nowhere"))
    with pytest.raises(FrameError, match="not readable"):
        TPRURow("<image>", (b"not an image",), "A").decoded()


def test_summary_and_samples(tmp_path):
    write_parquet(_rows(), tmp_path / "train" / "part-00000.parquet")
    write_parquet(_rows()[1:], tmp_path / "test" / "part-00000.parquet")
    stats = summarize(tmp_path)
    assert stats["train"]["rows"] == 2 and stats["test"]["rows"] == 1
    assert stats["train"]["tasks"] == {"next": 1, "ordering": 1}
    assert stats["train"]["answer_letters"] == {"B": 1} and stats["test"]["negatives"] == 1
    picked = sample_rows(tmp_path, 2, seed=3)
    assert len(picked) == 2 and all(split in ("train", "test") for split, _ in picked)
    assert sample_rows(tmp_path, 2, seed=3) == picked


SIZES = [(640, 480), (1920, 1080), (100, 100), (50, 4000), (224, 224), (168, 112), (33, 700), (4096, 4096),
         (300, 20), (197, 151)]


@pytest.mark.parametrize("width, height", SIZES)
def test_budget_size_is_what_the_sdk_serves(width, height):
    """The data builder sizes frames exactly as the SDK serves them (train as served)."""
    from tpru_agent.sizing import resize_to_budget

    assert budget_size(width, height) == resize_to_budget(Image.new("RGB", (width, height))).size


def test_fit_budget_matches_the_sdk_resize():
    from tpru_agent.sizing import resize_to_budget

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (300, 410, 3), dtype=np.uint8))
    ours, theirs = fit_budget(image), resize_to_budget(image)
    assert ours.size == theirs.size and ours.tobytes() == theirs.tobytes()
    assert ours.size == (224, 168)   # 410x300 -> 224x163 (PIL step) -> 224x168 (sides rounded to 28)
    assert fit_budget(ours) is ours  # already in budget: untouched
    with pytest.raises(FrameError, match="aspect ratio"):
        fit_budget(Image.new("RGB", (4000, 10)))
