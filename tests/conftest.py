"""Shared fixtures: one thread, the tiny offline Qwen2.5-VL checkpoint, synthetic frames, the reference data.

``TPRU_TINY_CACHE=/some/dir`` keeps the tiny checkpoint between test runs (it is rebuilt only when the recipe
changes); without it the checkpoint is built once per session in a temporary folder (a few seconds).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

# Before anything imports torch: two shared cores make multi-threaded timings swing 20-30x (FIELD-NOTES).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from tpru_agent.testing import synthetic_frames  # noqa: E402,F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
#: The fixed frame size of the tiny ONNX export: the size of ``synthetic_frames``, so hf and onnx see the same pixels.
ONNX_FRAME = "196x168"
_threads_pinned = False


def _pin_torch_threads() -> None:
    """``torch.set_num_threads(1)`` once torch is loaded (never imports torch itself)."""
    global _threads_pinned
    if not _threads_pinned and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
        _threads_pinned = True


def pytest_runtest_setup(item) -> None:
    _pin_torch_threads()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Folder of the ~1M-parameter random Qwen2.5-VL (Hub layout), built once per session (or reused)."""
    from tpru_agent.testing import build_tiny_checkpoint

    cache = os.environ.get("TPRU_TINY_CACHE")
    root = Path(cache).expanduser() if cache else tmp_path_factory.mktemp("tiny-qwen")
    folder = build_tiny_checkpoint(root / "tiny", size="tiny", seed=0)
    _pin_torch_threads()
    return folder


@pytest.fixture(scope="session")
def onnx_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported to ONNX (fp32, frames of :data:`ONNX_FRAME`), once per session. Read-only."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tpru_agent.onnx.export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "fp32", frame_size=ONNX_FRAME)


@contextlib.contextmanager
def serve_in_thread(app, *, timeout: float = 30.0):
    """Run an ASGI app (``tpru_agent.serve.create_app``) with uvicorn on a free loopback port; yields the base URL."""
    import uvicorn

    sys.path.insert(0, str(REPO))
    from benchmarks.server_load import free_port

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture
def frames4() -> list[Image.Image]:
    """Four small distinct RGB frames (196x168, inside the TPRU pixel budget)."""
    return synthetic_frames(4)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The TPRU authors' reference files (../shared/reference next to the repository); skipped when absent."""
    path = REPO.parent / "shared" / "reference"
    if not path.is_dir():
        pytest.skip(f"reference data not found at {path} (it lives next to the repository in ../shared/reference)")
    return path


#: ``max_new_tokens`` of :func:`tiny_tpru` (tests/test_server.py serves the same limit, so their answers compare).
TINY_MAX_NEW = 16


@pytest.fixture(scope="module")
def tiny_tpru(tiny_checkpoint):
    """``TPRU`` on the tiny checkpoint (hf engine, at most :data:`TINY_MAX_NEW` new tokens), one per test module."""
    from tpru_agent import TPRU

    model = TPRU(tiny_checkpoint, max_new_tokens=TINY_MAX_NEW)
    yield model
    model.close()
