"""dtype="auto" on CPU: fp32 while it fits comfortably in memory, bf16 beyond (the real 3B on a 23 GiB machine)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tpru_agent.engines.hf_options import cpu_auto_dtype  # noqa: E402

GIB = 1024 ** 3


def header_only_checkpoint(folder: Path, params: int) -> Path:
    """A safetensors file whose header declares ``params`` bf16 parameters (no data: only the header is read)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [params], "data_offsets": [0, 2 * params]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return folder


def test_real_3b_on_a_23_gib_machine_loads_in_bf16_and_says_why(tmp_path):
    folder = header_only_checkpoint(tmp_path / "3b", 3_755_000_000)
    dtype, reason = cpu_auto_dtype(folder, torch, available_bytes=23 * GIB)
    assert dtype == torch.bfloat16
    assert "bf16 on CPU because fp32 weights (14.0 GiB" in reason and "23.0 GiB available" in reason
    assert cpu_auto_dtype(folder, torch, available_bytes=64 * GIB)[0] == torch.float32  # a big machine keeps fp32


def test_small_models_keep_fp32_and_info_reports_the_choice(tiny_checkpoint):
    dtype, reason = cpu_auto_dtype(tiny_checkpoint, torch, available_bytes=GIB)
    assert dtype == torch.float32 and "fit comfortably" in reason
    assert cpu_auto_dtype(tiny_checkpoint, torch, available_bytes=8 * 2 ** 20)[0] == torch.bfloat16
    from tpru_agent.engines.hf import HFEngine

    engine = HFEngine(tiny_checkpoint, device="cpu")
    info = engine.info()
    assert info["dtype"] == "float32" and info["dtype_reason"].startswith("auto: fp32 on CPU")
    assert HFEngine(tiny_checkpoint, device="cpu", dtype="bf16").info()["dtype_reason"] == "as asked"
