"""fsutil.atomic_dir: the one way a folder (checkpoint, export) is published."""

from __future__ import annotations

import shutil
import stat

import pytest

from tpru_agent.fsutil import atomic_dir, umask


def test_atomic_dir_publishes_a_new_folder_with_usual_modes(tmp_path):
    target = tmp_path / "deep" / "export"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.is_dir() and not target.exists()
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "model.safetensors").chmod(0o600)   # what safetensors leaves
    assert (target / "model.safetensors").read_bytes() == b"w"
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask()
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o666 & ~umask()
    assert sorted(p.name for p in target.parent.iterdir()) == ["export"]   # no temporary left beside it


def test_atomic_dir_replaces_an_existing_folder_whole(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_dir_leaves_the_target_as_it_was_on_error(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("half way")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_dir_publishes_nothing_when_the_block_removes_its_folder(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "theirs.txt").write_text("finished by another process")
    with atomic_dir(target) as tmp:
        (tmp / "mine.txt").write_text("same build")
        shutil.rmtree(tmp)
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
