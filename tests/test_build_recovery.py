"""Builds and files that recover: failed starts leave nothing behind, damaged files are redone, modes are usual."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from episode_data import palette, write_folders

from tpru_agent.cli.main import cli
from tpru_agent.errors import ConfigError
from tpru_agent.finetune.data.build import BuildConfig, build
from tpru_agent.finetune.data.tpru_format import read_parquet
from tpru_agent.fsutil import replace_dir, umask, write_text

COLORS = palette(12, seed=3)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eps") / "toy"
    write_folders(root, [{"name": f"ep{i}", "color": COLORS[i], "frames": 8, "description": f"task {i % 3}"}
                         for i in range(10)])
    return root


def _cfg(source: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(sources=(f"frames:{source}",), out=str(out), samples_per_episode=2, shard_size=4, **kw)


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_a_failed_start_does_not_block_the_corrected_command(source, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="frames source .* is not a folder"):
        build(BuildConfig(sources=(f"frames:{source}-typo",), out=str(out)))   # fails before any work
    assert not out.exists()                                   # no .lock, no .work, no empty folder
    out.mkdir()
    with pytest.raises(ConfigError, match="held-out task"):
        build(_cfg(source, out, holdout_tasks=("task 9",)))   # fails after the episodes were cached
    assert sorted(p.name for p in out.iterdir()) == [".work"]  # the cache stays (a rerun resumes); no .lock
    result = build(_cfg(source, out, seed=1))                 # other settings: runs, not "holds a build"
    assert sum(result.manifest["samples"].values()) > 0
    with pytest.raises(ConfigError, match="other settings"):  # a build that wrote samples is still protected
        build(_cfg(source, out, seed=2))


def test_damaged_shards_and_cache_files_are_redone(source, tmp_path):
    out = tmp_path / "out"
    first = build(_cfg(source, out, keep_work=True)).manifest
    shard = sorted((out / "train").glob("*.parquet"))[0]
    unit = sorted((out / ".work" / "units").glob("*.parquet"))[0]
    (out / "manifest.json").unlink()        # as if killed before the manifest: shards and cache are reused
    shard.write_bytes(b"")                  # a 0-byte shard under its final name
    unit.write_bytes(unit.read_bytes()[:100] + b"x" * 200)   # a torn cache file
    again = build(_cfg(source, out, keep_work=True)).manifest
    assert again["content_hash"] == first["content_hash"]
    assert len(list(read_parquet(shard))) == 4


def test_overwrite_starts_afresh_and_show_reads_a_keep_work_build(source, tmp_path):
    out = tmp_path / "out"
    build(_cfg(source, out, keep_work=True))
    for unit in (out / ".work" / "units").glob("*.parquet"):
        unit.write_bytes(b"PAR1 garbage")
    assert not build(_cfg(source, out, keep_work=True, overwrite=True)).already_done
    shown = _run("data", "show", out, "-n", "1", "--sheet", "none", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["splits"]


def test_test_fraction_one_puts_every_episode_in_test(source, tmp_path):
    manifest = build(_cfg(source, tmp_path / "out", test_fraction=1.0)).manifest
    assert manifest["samples"]["train"] == 0 and manifest["episodes"]["train"] == 0
    assert manifest["episodes"]["test"] == 10


def test_a_flat_folder_of_images_is_refused_with_the_layout(tmp_path):
    flat = tmp_path / "flat"
    write_folders(tmp_path, [{"name": "flat", "color": COLORS[0], "frames": 8}])
    result = CliRunner().invoke(cli, ["data", "build", "-s", f"frames:{flat}", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "holds images, not episode folders" in result.stderr and "subfolder" in result.stderr


def test_non_utf8_file_names_build(source, tmp_path):
    root = tmp_path / "src"
    write_folders(root, [{"name": f"ep{i}", "color": COLORS[i], "frames": 8} for i in range(6)])
    os.rename(root / "ep0", os.fsdecode(bytes(root) + b"/ep\xff"))
    os.rename(root / "ep1" / "frame_0.png", os.fsdecode(bytes(root) + b"/ep1/\xe9.png"))
    result = _run("data", "build", "-s", f"frames:{root}", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    ids = {r.episode_id for r in read_parquet(tmp_path / "out")}
    assert any(i.endswith("ep\\xff") for i in ids)
    assert "wrote" not in result.stderr


def test_one_sample_is_singular(source, tmp_path):
    result = _run("data", "build", "-s", f"frames:{source}", "-o", tmp_path / "o", "--samples-per-episode", "1")
    assert result.exit_code == 0 and " samples to " in result.stderr
    assert "1 samples" not in result.stderr


def test_atomic_writes_and_folders_get_the_usual_modes(tmp_path):
    usual_file, usual_dir = 0o666 & ~umask(), 0o777 & ~umask()
    write_text(tmp_path / "a.json", "{}")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == usual_file
    src = tmp_path / "tmp"
    src.mkdir(mode=0o700)
    (src / "model.safetensors").write_bytes(b"x")
    os.chmod(src / "model.safetensors", 0o600)       # what safetensors / mkstemp leave
    replace_dir(src, tmp_path / "final")
    assert stat.S_IMODE((tmp_path / "final" / "model.safetensors").stat().st_mode) == usual_file
    assert stat.S_IMODE((tmp_path / "final").stat().st_mode) == usual_dir


def test_build_tiny_writes_usual_modes(tmp_path):
    result = _run("testing", "build-tiny", tmp_path / "tiny")
    assert result.exit_code == 0, result.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "tiny").iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask(), modes


def test_a_parquet_rewritten_through_pandas_still_loads_for_training(source, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("datasets")
    from tpru_agent.finetune.train.inputs import load_split

    build(_cfg(source, tmp_path / "data"))
    for shard in (tmp_path / "data" / "train").glob("*.parquet"):
        pd.read_parquet(shard).to_parquet(shard)          # drops the Hugging Face image type metadata
    ds = load_split(tmp_path / "data", "train", cache_dir=str(tmp_path / "cache"))
    example = ds[0]
    assert example["images"] and all(hasattr(im, "size") for im in example["images"])


def test_the_final_checkpoint_swap_gives_usual_modes(tmp_path):
    """write_final publishes through fsutil.atomic_dir: a new final, then one replacing it, both in usual modes."""
    from tpru_agent.fsutil import atomic_dir

    for round_ in range(2):   # a new final, then one replacing it
        with atomic_dir(tmp_path / "final") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * round_)
            os.chmod(tmp / "model.safetensors", 0o600)   # as safetensors' save_file leaves it
        assert stat.S_IMODE((tmp_path / "final" / "model.safetensors").stat().st_mode) == 0o666 & ~umask()
        assert (tmp_path / "final" / "model.safetensors").stat().st_size == round_
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
