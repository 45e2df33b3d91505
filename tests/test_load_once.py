"""Each public call decodes and sizes each frame once, and nothing under it sizes a frame again.

253x163 is a size whose served size is not a fixed point of the budget resize (it is served at 252x168, which
alone would be served at 224x168): an engine resizing the SDK's frames again would show up here as extra resizes
and as the wrong size reaching the processor.
"""

from __future__ import annotations

import pytest
from conftest import synthetic_frames
from PIL import Image

import tpru_agent.frames as frames_module
from tpru_agent import TPRU, ProcedureChecker
from tpru_agent.frames import load_frames
from tpru_agent.sizing import TPRU_BUDGET, budget_size, is_served, resize_to_budget

ODD = (253, 163)
SERVED = budget_size(*ODD)


class Spy:
    """Counts decodes (``PIL.Image.open``), budget resizes (RGB, not the 32x32 thumbnails) and frame loader
    calls; each call runs the real function."""

    def __init__(self, monkeypatch):
        self.opened, self.resized, self.loader = 0, [], []
        real_open, real_resize = Image.open, Image.Image.resize

        def opened(*a, **k):
            self.opened += 1
            return real_open(*a, **k)

        def resized(image, size, *a, **k):
            if image.mode == "RGB" and tuple(size) != (32, 32):
                self.resized.append((image.size, tuple(size)))
            return real_resize(image, size, *a, **k)

        monkeypatch.setattr(Image, "open", opened)
        monkeypatch.setattr(Image.Image, "resize", resized)
        for name in ("load_frame", "load_frames"):
            real = getattr(frames_module, name)
            monkeypatch.setattr(frames_module, name,
                                lambda *a, _real=real, _name=name, **k: self.loader.append(_name) or _real(*a, **k))


def _files(tmp_path, n: int) -> list[str]:
    paths = []
    for i, im in enumerate(synthetic_frames(n, size=ODD)):
        paths.append(str(tmp_path / f"f{i}.png"))
        im.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    pytest.importorskip("torch")
    with TPRU(tiny_checkpoint, device="cpu", debias=2, prefix_cache_mb=0) as model:
        yield model


def test_verify_step_decodes_and_sizes_each_frame_once(tiny, tmp_path, monkeypatch):
    paths = _files(tmp_path, 3)
    spy = Spy(monkeypatch)
    verdict = tiny.verify_step(paths[:2], paths[2], mode="fast")
    assert verdict.timings["calls"] == 2  # debias=2 with one candidate: the None option last, then first
    assert spy.opened == 3 and spy.loader == ["load_frames", "load_frame"]
    # two resize steps per frame (the PIL budget step, then sides to multiples of 28), all in the loader
    assert len(spy.resized) == 3 * 2 and all(to == SERVED for _, to in spy.resized[1::2])


def test_the_engine_receives_the_frames_as_loaded(tiny, tmp_path, monkeypatch):
    paths = _files(tmp_path, 3)
    seen = []
    real_score = tiny.engine.score

    def score(request, *a, **k):
        seen.extend(request.images)
        return real_score(request, *a, **k)

    monkeypatch.setattr(tiny.engine, "score", score)
    spy = Spy(monkeypatch)
    tiny.verify_step(paths[:2], paths[2], mode="fast")
    assert {im.size for im in seen} == {SERVED} and all(is_served(im, tiny.budget) for im in seen)
    assert len(spy.resized) == 6  # the engine's own sizing passed every frame through


def test_checker_observe_loads_each_frame_once_and_reuses_the_history(tiny, tmp_path, monkeypatch):
    paths = _files(tmp_path, 4)
    spy = Spy(monkeypatch)
    checker = ProcedureChecker(tiny, window=3, duplicate_threshold=0.0)
    events = [checker.observe(p) for p in paths]
    judged = [e for e in events[1:] if not e.duplicate]
    assert judged and all(e.usage["prompt_tokens"] > 0 for e in judged)
    assert spy.opened == 4 and spy.loader == ["load_frame"] * 4  # one load per observed frame, none below it
    assert len(spy.resized) == 4 * 2  # history frames handed back to verify_step are not resized again


def test_served_frames_pass_through_and_others_are_sized():
    frame = synthetic_frames(1, size=ODD)[0]
    served = resize_to_budget(frame, TPRU_BUDGET)
    assert served is not frame and served.size == SERVED and is_served(served, TPRU_BUDGET)
    assert resize_to_budget(served, TPRU_BUDGET) is served  # not resized to budget_size(*SERVED), a different size
    assert budget_size(*SERVED) != SERVED
    assert load_frames([served, frame], budget=TPRU_BUDGET)[0] is served
    again = load_frames([frame], budget=TPRU_BUDGET)[0]  # the loader's own output, handed back in
    assert again.size == SERVED and load_frames([again], budget=TPRU_BUDGET)[0] is again
    copy = served.copy()  # a copy is a new frame: sized like any other
    assert not is_served(copy, TPRU_BUDGET) and resize_to_budget(copy, TPRU_BUDGET).size == budget_size(*SERVED)
    assert not is_served(served, None)


def test_marks_survive_garbage_collection_inside_marking():
    """Marked images freed by a collection that runs while another image is being marked: the mark of a freed
    image goes (no leak) and marking completes (a lock shared with the weakref callback deadlocks on 3.12+)."""
    import gc
    import threading

    from tpru_agent import sizing

    def churn():
        for _ in range(300):
            image = resize_to_budget(Image.new("RGB", ODD), TPRU_BUDGET)
            holder = {"image": image}
            holder["self"] = holder  # a cycle: only the collector frees it, at any allocation
    before, threshold = len(sizing._MARKS), gc.get_threshold()
    gc.set_threshold(1)
    try:
        worker = threading.Thread(target=churn, daemon=True)
        worker.start()
        worker.join(60)
    finally:
        gc.set_threshold(*threshold)
    assert not worker.is_alive(), "marking deadlocked under garbage collection"
    gc.collect()
    assert len(sizing._MARKS) <= before + 1
