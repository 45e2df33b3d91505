"""Shared fixtures: one thread, the tiny offline Qwen2.5-VL checkpoint, synthetic frames, the reference data.

``TPRU_TINY_CACHE=/some/dir`` keeps the tiny checkpoint between test runs (it is rebuilt only when the recipe
changes); without it the checkpoint is built once per session in a temporary folder (a few seconds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before anything imports torch: two shared cores make multi-threaded timings swing 20-30x (FIELD-NOTES).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from tpru_agent.testing import synthetic_frames  # noqa: E402,F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
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
