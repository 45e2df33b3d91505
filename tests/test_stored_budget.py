"""Frames a build stored at their served size are trained and evaluated at that size, as a raw frame is served.

253x163 is a size whose served size (252x168) is not a fixed point of the budget resize: sized again it would
become 224x168. A build stores 252x168; training and eval at the same budget must see 252x168, not 224x168.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from episode_data import palette, write_folders
from PIL import Image

from tpru_agent.finetune.data.build import BuildConfig, build
from tpru_agent.finetune.data.tpru_format import read_parquet, stored_budget
from tpru_agent.sizing import TPRU_BUDGET, PixelBudget, budget_size

ODD = (253, 163)
SERVED = budget_size(*ODD)
TWICE = budget_size(*SERVED)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    assert SERVED != TWICE  # the premise: sizing twice changes the size
    root = tmp_path_factory.mktemp("odd")
    colors = palette(6, seed=3)
    write_folders(root / "toy", [{"name": f"ep{i}", "color": colors[i], "frames": 8, "size": ODD,
                                  "description": "stack the blocks", "domain": "toy"} for i in range(6)])
    out = tmp_path_factory.mktemp("built") / "data"
    build(BuildConfig(sources=(f"frames:{root / 'toy'}",), out=str(out), samples_per_episode=4, shard_size=64,
                      test_fraction=0.34))
    return out


def test_the_manifest_records_the_budget_frames_are_stored_at(data):
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["frames_budget"] == {"min_pixels": TPRU_BUDGET.min_pixels,
                                         "max_pixels": TPRU_BUDGET.max_pixels, "factor": TPRU_BUDGET.factor}
    row = next(iter(read_parquet(data / "train")))
    assert {Image.open(io.BytesIO(png)).size for png in row.images} == {SERVED}
    for where in (data, data / "train", next((data / "train").glob("*.parquet"))):
        assert stored_budget(where) == TPRU_BUDGET
    del manifest["frames_budget"]  # a build from before the key: the builder always stored at TPRU's budget
    (data / "manifest.json").write_text(json.dumps(manifest))
    try:
        assert stored_budget(data) == TPRU_BUDGET
    finally:
        manifest["frames_budget"] = {"min_pixels": TPRU_BUDGET.min_pixels, "max_pixels": TPRU_BUDGET.max_pixels,
                                     "factor": TPRU_BUDGET.factor}
        (data / "manifest.json").write_text(json.dumps(manifest))


def test_a_folder_without_a_build_manifest_is_not_known_sized(tmp_path):
    assert stored_budget(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    assert stored_budget(tmp_path) is None


def test_training_uses_stored_frames_as_stored_at_the_same_budget(data):
    pytest.importorskip("datasets")
    from tpru_agent.finetune.train.inputs import load_split

    same = load_split(data, "train", limit=3)
    assert {im.size for ex in same for im in ex["images"]} == {SERVED}
    other = PixelBudget(min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28)  # another budget: sized to it, once
    smaller = load_split(data, "train", min_pixels=other.min_pixels, max_pixels=other.max_pixels, limit=3)
    assert {im.size for ex in smaller for im in ex["images"]} == {budget_size(*SERVED, other)}


def test_eval_uses_stored_frames_as_stored_and_the_engine_keeps_them(data, tiny_checkpoint):
    pytest.importorskip("torch")
    from tpru_agent import TPRU
    from tpru_agent.finetune.eval.dataset import open_dataset
    from tpru_agent.finetune.eval.run import prepare_row

    dataset = open_dataset(data, split="test")
    assert dataset.frames_budget == TPRU_BUDGET
    with TPRU(tiny_checkpoint, device="cpu", prefix_cache_mb=0) as model:
        seen = []
        real = model.engine.score

        def score(request, *a, **k):
            seen.extend(request.images)
            return real(request, *a, **k)

        model.engine.score = score
        row = next(iter(dataset))
        question, images = prepare_row(model, row, dataset.frames_budget)
        assert {im.size for im in images} == {SERVED}
        model.ask(question, images, mode="fast")
        assert seen and {im.size for im in seen} == {SERVED}
        _, resized = prepare_row(model, row)  # not known to be stored sized: sized like any frame (twice here)
        assert {im.size for im in resized} == {TWICE}


def test_only_the_builds_own_manifest_counts(data, tmp_path):
    import shutil

    foreign = data / "ext" / "test"  # someone else's dataset placed inside a build folder
    foreign.mkdir(parents=True)
    shutil.copy(next((data / "test").glob("*.parquet")), foreign / "x.parquet")
    try:
        assert stored_budget(foreign) is None and stored_budget(foreign / "x.parquet") is None
    finally:
        shutil.rmtree(data / "ext")
    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert stored_budget(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tpru-data/1", "frames_budget": {"factor": 28}}))
    assert stored_budget(tmp_path) is None


def test_a_frame_used_as_stored_must_look_served():
    from tpru_agent.finetune.data.tpru_format import looks_served

    assert looks_served(SERVED, TPRU_BUDGET) and looks_served(TWICE, TPRU_BUDGET)
    assert not looks_served(ODD, TPRU_BUDGET) and not looks_served((640, 480), TPRU_BUDGET)
    assert not looks_served((56, 56), TPRU_BUDGET)  # multiples of 28, but far under the budget


def test_the_training_processor_only_rounds_frames_already_sized(tiny_checkpoint):
    pytest.importorskip("transformers")
    from tpru_agent.finetune.train.config import resolve_config
    from tpru_agent.finetune.train.modeling import load_processor

    processor = load_processor(tiny_checkpoint, resolve_config(overrides={"data": "unused"}))
    sizes = [(224, 168), SERVED, (196, 196)]  # each over max_pixels once rounded: a budget-bound processor shrank them
    for size in sizes:
        grid = processor.image_processor(images=[Image.new("RGB", size)], return_tensors="np")["image_grid_thw"][0]
        assert (int(grid[2]) * 14, int(grid[1]) * 14) == size


def test_an_unreadable_budget_record_is_said_not_silent(tmp_path, caplog):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tpru-data/1", "frames_budget": {"factor": 28}}))
    with caplog.at_level("WARNING"):
        assert stored_budget(tmp_path) is None
    assert "not a pixel budget" in caplog.text and "sized like any others" in caplog.text
