"""Atomic file-system moves shared by everything that writes a folder (checkpoints, exports)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``; an existing ``dst`` is moved aside first, so readers never see a half folder."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        os.replace(dst, old / "x")
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
