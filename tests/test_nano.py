"""tpru-nano plumbing: the packaged folder's name, the CLI fallback choice, the onnxruntime / -gpu clash.

The real model is not in the repository yet; these tests use a fake packaged folder (``hub.PACKAGED_DIR``
monkeypatched) built from the tiny checkpoint. Real-answer tests on the shipped model belong with the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tpru_agent import hub
from tpru_agent.engines.ort_setup import CPU_FIX, GPU_FIX, runtime_problem
from tpru_agent.errors import ModelNotFoundError

ROOT = Path(__file__).resolve().parents[1]
CPU = ["CPUExecutionProvider"]
GPU = ["CUDAExecutionProvider", "CPUExecutionProvider"]
BUDGET = {"min_pixels": 3136, "max_pixels": 12544}  # 112x112 frames: not TPRU's, so it is seen to be honoured


# ------------------------------------------------------------------------------------------ fallback choice
@pytest.mark.parametrize("shipped, card, expected", [
    (True, {"default_fallback": True}, "tpru-nano"),
    (True, {"default_fallback": False}, "classic"),
    (True, {"default_fallback": "true"}, "classic"),   # only the JSON literal true counts
    (True, {}, "classic"),
    (True, None, "classic"),                            # no card
    (True, ["default_fallback"], "classic"),            # not an object
    (False, {"default_fallback": True}, "classic"),     # flagged but not shipped
    (False, None, "classic"),
])
def test_choose_fallback(shipped, card, expected):
    assert hub.choose_fallback(shipped, card) == expected


@pytest.mark.parametrize("files, expected", [
    ({}, "classic"),
    ({"config.json": "{}"}, "classic"),
    ({"config.json": "{}", hub.PACKAGED_CARD: '{"default_fallback": true}'}, "tpru-nano"),
    ({"onnx/tpru_onnx.json": "{}", hub.PACKAGED_CARD: '{"default_fallback": true}'}, "tpru-nano"),
    ({"config.json": "{}", hub.PACKAGED_CARD: '{"default_fallback": false}'}, "classic"),
    ({"config.json": "{}", hub.PACKAGED_CARD: "{not json"}, "classic"),
    ({"README.md": "x", hub.PACKAGED_CARD: '{"default_fallback": true}'}, "classic"),  # card alone: no model
])
def test_fallback_model_reads_the_models_folder(tmp_path, files, expected):
    for name, text in files.items():
        path = tmp_path / "tpru-nano" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert hub.fallback_model(tmp_path) == expected


def test_the_cli_falls_back_to_the_one_constant():
    from tpru_agent.cli import main

    assert main.FALLBACK_MODEL is hub.FALLBACK_MODEL == hub.fallback_model()
    assert main.FALLBACK_LABEL == main.FALLBACK_LABELS[hub.FALLBACK_MODEL]
    assert set(main.FALLBACK_LABELS) == {"classic", *hub.PACKAGED}


# ------------------------------------------------------------------------------------------ name resolution
def test_tpru_nano_not_shipped_is_a_clear_error(tmp_path, monkeypatch):
    from tpru_agent import TPRU

    monkeypatch.setattr(hub, "PACKAGED_DIR", tmp_path)
    for call in (lambda: hub.resolve("tpru-nano"), lambda: TPRU("tpru-nano"), lambda: TPRU("TPRU-Nano", engine="hf"),
                 lambda: hub.locate("tpru-nano")):
        with pytest.raises(ModelNotFoundError, match="not shipped with this install.*hf download Stephengzk/TPRU-3B"):
            call()
    assert hub.cache_state("tpru-nano") == "missing"
    with pytest.raises(ModelNotFoundError, match="Did you mean 'tpru-nano'"):
        hub.resolve("tpru-nan")


def test_tpru_nano_resolves_to_the_packaged_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "PACKAGED_DIR", tmp_path)
    folder = tmp_path / "tpru-nano"
    (folder / "onnx").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2_5_vl"}', encoding="utf-8")
    ref = hub.resolve("tpru-nano")
    assert ref.kind == "local" and Path(ref.target) == folder and ref.packaged and not ref.is_onnx
    assert ref.onnx_folder is None  # no export beside it yet
    (folder / "onnx" / hub.ONNX_MANIFEST).write_text("{}", encoding="utf-8")
    assert ref.onnx_folder == folder / "onnx"
    assert hub.cache_state("tpru-nano") == "local"
    (folder / "model.bin").write_bytes(b"pickle")  # safetensors only, as for any model folder
    with pytest.raises(ModelNotFoundError, match="pickle weights are refused"):
        hub.locate("tpru-nano")
    (folder / "config.json").write_text('{"model_type": "evil", "auto_map": {"AutoModel": "x.Y"}}', encoding="utf-8")
    with pytest.raises(ModelNotFoundError, match="never executes code"):
        hub.locate("tpru-nano")


# ------------------------------------------------------------------------------------------ onnxruntime clash
@pytest.mark.parametrize("installed, providers, wants_cuda, fix", [
    ({"onnxruntime": "1.22.0", "onnxruntime-gpu": None}, CPU, False, None),           # the bare install
    ({"onnxruntime": None, "onnxruntime-gpu": "1.22.0"}, GPU, True, None),            # a fixed GPU install
    ({"onnxruntime": None, "onnxruntime-gpu": "1.22.0"}, GPU, False, None),
    ({"onnxruntime": "1.22.0", "onnxruntime-gpu": None}, CPU, True, GPU_FIX),         # CUDA asked, CPU build
    ({"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"}, CPU, False, GPU_FIX),    # both; the CPU one won
    ({"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"}, CPU, True, GPU_FIX),
    ({"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"}, GPU, False, GPU_FIX),    # works, but fragile
    ({"onnxruntime": None, "onnxruntime-gpu": None}, [], True, GPU_FIX),
])
def test_runtime_problem(installed, providers, wants_cuda, fix):
    problem = runtime_problem(installed, providers, wants_cuda)
    if fix is None:
        assert problem is None
    else:
        assert fix in problem
        both = all(installed.values())
        assert ("both onnxruntime" in problem) == both and ((f"`{CPU_FIX}`" in problem) == both)
        if both:
            assert ("won" in problem) == ("CUDAExecutionProvider" not in providers)


def test_cuda_asked_without_provider_names_the_fix(caplog):
    pytest.importorskip("onnxruntime")
    from tpru_agent.engines.onnx import pick_providers, warn_setup

    with caplog.at_level("WARNING"):
        assert pick_providers("cuda", CPU) == (["CPUExecutionProvider"], False)
        warn_setup("problem X")
        warn_setup("problem X")  # once per process
    assert GPU_FIX in caplog.text and caplog.text.count("problem X") == 1


def test_cli_env_and_models_show_runtime_and_tpru_nano():
    from click.testing import CliRunner

    from tpru_agent.cli.main import cli

    env = CliRunner().invoke(cli, ["env", "--json"])
    assert env.exit_code == 0, env.output
    ort = json.loads(env.stdout)["onnxruntime"]
    assert set(ort["distributions"]) == {"onnxruntime", "onnxruntime-gpu"} and "CPUExecutionProvider" in ort["providers"]
    models = CliRunner().invoke(cli, ["models", "--json"])
    rows = {r["name"]: r for r in json.loads(models.stdout)["models"]}
    assert rows["tpru-nano"]["state"] in {"packaged", "not shipped in this install"} and "classic" in rows


# ------------------------------------------------------------------------------------------ packaging
def test_package_data_carries_the_models_folder():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]["tpru_agent"]
    for pattern in ("models/tpru-nano/*.safetensors", "models/tpru-nano/*.json", "models/tpru-nano/README.md",
                    "models/tpru-nano/onnx/*.onnx", "models/tpru-nano/onnx/*.onnx.data", "models/tpru-nano/onnx/*.json"):
        assert pattern in data, pattern
    base = " ".join(config["project"]["dependencies"])
    assert "onnxruntime" in base and "tokenizers" in base and "torch" not in base


def test_the_packaged_model_fits_the_wheel():
    """The shipped folder (when present) stays under the ~40 MB wheel cap and holds no pickle weights."""
    folder = hub.PACKAGED_DIR
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    assert sum(p.stat().st_size for p in files) < 40 * 1024**2
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]


# ------------------------------------------------------------------------------------------ a fake tpru-nano
@pytest.fixture(scope="module")
def models_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """A models folder holding a tpru-nano built from the tiny checkpoint: hf weights, own budget, onnx/ export."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from tpru_agent.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("models")
    folder = root / "tpru-nano"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "tpru_budget.json").write_text(json.dumps(BUDGET), encoding="utf-8")
    export_onnx(folder, folder / "onnx")
    (folder / hub.PACKAGED_CARD).write_text('{"default_fallback": true}', encoding="utf-8")
    return root


def _square_frames():
    from tpru_agent.testing import synthetic_frames

    return synthetic_frames(4, size=(224, 224))  # served at 112x112 under BUDGET: the export's own frame size


def test_tpru_nano_runs_on_onnx_by_default_and_hf_by_name(models_dir, monkeypatch):
    from tpru_agent import TPRU

    monkeypatch.setattr(hub, "PACKAGED_DIR", models_dir)
    assert hub.fallback_model(models_dir) == "tpru-nano"
    onnx = TPRU("tpru-nano", threads=1)
    assert onnx.engine_name == "onnx" and onnx.engine.folder == models_dir / "tpru-nano" / "onnx"
    assert (onnx.budget.min_pixels, onnx.budget.max_pixels) == (3136, 12544) and onnx.engine.frame_size == (112, 112)
    hf = TPRU("tpru-nano", engine="hf", device="cpu")
    assert hf.engine_name == "hf" and hf.engine.folder == models_dir / "tpru-nano" and hf.budget == onnx.budget
    a = onnx.order_frames(_square_frames(), mode="fast")
    b = hf.order_frames(_square_frames(), mode="fast")
    assert a.order == b.order and abs(a.confidence - b.confidence) < 1e-3
    assert TPRU("tpru-nano", engine="onnx", threads=1).engine_name == "onnx"


def test_an_explicit_budget_beats_the_folders_own_even_when_it_equals_tprus(models_dir, monkeypatch):
    from tpru_agent import TPRU
    from tpru_agent.sizing import TPRU_BUDGET

    monkeypatch.setattr(hub, "PACKAGED_DIR", models_dir)
    hf = TPRU("tpru-nano", engine="hf", device="cpu", budget=TPRU_BUDGET)
    assert hf.budget == TPRU_BUDGET == hf.engine.budget   # not the folder's 3136..12544


def test_tpru_nano_answers_without_torch(models_dir):
    """The bare install's path: the facade picks onnx for tpru-nano and nothing imports torch or transformers."""
    code = (
        "import sys\n"
        "from tpru_agent import TPRU, hub\n"
        "from tpru_agent.testing import synthetic_frames\n"
        f"hub.PACKAGED_DIR = __import__('pathlib').Path({str(models_dir)!r})\n"
        "model = TPRU('tpru-nano', threads=1)\n"
        "result = model.order_frames(synthetic_frames(4, size=(224, 224)), mode='fast')\n"
        "assert result.engine == 'onnx' and sorted(result.order) == [0, 1, 2, 3], result\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_falls_back_to_tpru_nano_when_flagged(models_dir, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from tpru_agent.cli import main

    monkeypatch.setattr(hub, "PACKAGED_DIR", models_dir)
    monkeypatch.setattr(main, "FALLBACK_MODEL", "tpru-nano")
    monkeypatch.setattr(main, "FALLBACK_LABEL", main.FALLBACK_LABELS["tpru-nano"])
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, image in enumerate(_square_frames()):
        image.save(frames / f"{i}.png")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = CliRunner().invoke(main.cli, ["order", str(frames), "--mode", "fast", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert "falling back to tpru-nano" in result.stderr and "hf download Stephengzk/TPRU-3B" in result.stderr
    assert json.loads(result.stdout)["engine"] == "onnx"
    strict = CliRunner().invoke(main.cli, ["order", str(frames), "--strict"], env=env)
    assert strict.exit_code == 1 and "falling back" not in strict.stderr
    classic = CliRunner().invoke(main.cli, ["order", str(frames), "--model", "classic", "--json"], env=env)
    assert classic.exit_code == 0 and json.loads(classic.stdout)["engine"] == "classic"
