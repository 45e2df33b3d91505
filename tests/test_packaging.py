"""The wheel carries every package and the data files the code opens (accelerate configs), as pyproject says."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folder_of(package: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools looks for ``package`` (the longest mapped prefix wins)."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return ROOT / package_dir[prefix] / Path(*parts[cut:])
    return ROOT / Path(*parts)


def test_every_package_folder_is_listed():
    config = _setuptools()
    listed = {_folder_of(p, config["package-dir"]).resolve() for p in config["packages"]}
    roots = {ROOT / d for d in config["package-dir"].values()}
    on_disk = {init.parent.resolve() for root in roots for init in root.rglob("__init__.py")
               if "__pycache__" not in init.parts}
    assert not on_disk - listed, f"packages missing from pyproject's [tool.setuptools] packages: {on_disk - listed}"


def test_package_data_covers_the_accelerate_configs():
    data = _setuptools()["package-data"]
    configs = sorted((ROOT / "finetune" / "train" / "accelerate_configs").glob("*.yaml"))
    assert configs and "accelerate_configs/*.yaml" in data["tpru_agent.finetune.train"]


@pytest.mark.slow
def test_the_built_wheel_holds_the_packages_and_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("tpru_agent-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("tpru_agent/cli/main.py", "tpru_agent/serve/app.py", "tpru_agent/video.py",
                   "tpru_agent/onnx/export.py", "tpru_agent/finetune/eval/run.py",
                   "tpru_agent/finetune/train/accelerate_configs/zero3.yaml", "tpru_agent/py.typed"):
        assert needed in names, needed
