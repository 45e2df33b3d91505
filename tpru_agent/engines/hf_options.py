"""Options of the transformers engine, checked before any weights load: device, dtype, quantisation.

Example:
    >>> check_quantization("none") is None
    True
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tpru_agent import hub
from tpru_agent.errors import ConfigError, close_matches, require

log = logging.getLogger(__name__)

QUANTIZATIONS = ("4bit", "8bit")
_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def pick_device(device: str, torch) -> str:
    """``"auto"`` -> cuda > mps > cpu; an explicit device is checked against what this machine has."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device ({exc}); use 'auto', 'cpu', 'cuda', "
                          "'cuda:1' or 'mps'") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here; use device='auto' "
                          "or 'cpu'")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} was asked for but MPS is not available here; use device='auto'")
    return str(device)


def pick_dtype(dtype, device: str, torch):
    """``"auto"`` -> bf16 on CUDA (fp16 before Ampere), fp32 elsewhere; ``fp32`` / ``bf16`` / ``fp16``; a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        # GPUs before Ampere (T4, V100) have no fast bf16: half precision is their native format.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use 'auto', 'fp32', 'bf16' or 'fp16'."
                          + close_matches(name, _DTYPES))
    return getattr(torch, _DTYPES[name])


#: "auto" on CPU keeps fp32 only while fp32 loading peaks (~1.5x the fp32 weights: the real 3B, 14 GiB of fp32
#: weights, peaked at 21.6 GiB RSS) within this share of the available memory; above it, bf16 (peak 8.7 GiB).
CPU_FP32_SHARE = 0.5
_FP32_PEAK = 1.5


def cpu_auto_dtype(folder, torch, available_bytes: int | None = None):
    """``(dtype, reason)`` for ``dtype="auto"`` on CPU: fp32 when it fits comfortably in memory, else bf16.

    The fp32 size is counted from the safetensors headers in ``folder`` (no weights are read); the available
    memory is ``MemAvailable`` (``/proc/meminfo``), else the physical memory.

    Example:
        >>> import torch
        >>> cpu_auto_dtype("/nonexistent", torch, available_bytes=2**30)[0]
        torch.float32
    """
    from pathlib import Path

    params = sum(_safetensors_numel(f) for f in Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else 0
    available = available_bytes if available_bytes is not None else _available_memory()
    fp32 = params * 4
    gib = 1024 ** 3
    if not params or not available:
        return torch.float32, "auto: fp32 on CPU (model size or memory unknown)"
    if _FP32_PEAK * fp32 <= CPU_FP32_SHARE * available:
        return torch.float32, (f"auto: fp32 on CPU (fp32 weights {fp32 / gib:.1f} GiB fit comfortably in "
                               f"{available / gib:.1f} GiB available)")
    return torch.bfloat16, (f"auto: bf16 on CPU because fp32 weights ({fp32 / gib:.1f} GiB, "
                            f"~{_FP32_PEAK * fp32 / gib:.1f} GiB peak while loading) would not fit comfortably in "
                            f"{available / gib:.1f} GiB available; pass dtype='fp32' to force it")


def _available_memory() -> int:
    import os

    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _safetensors_numel(file) -> int:
    """Elements in a safetensors file, read from its JSON header."""
    import json
    import struct

    try:
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return 0
    total = 0
    for key, info in header.items():
        if key != "__metadata__":
            n = 1
            for dim in info.get("shape", []):
                n *= dim
            total += n
    return total


def check_quantization(quantization: str | None) -> str | None:
    """``None`` / ``"none"`` -> ``None``; ``"4bit"`` / ``"8bit"`` kept; anything else is a :class:`ConfigError`."""
    if quantization is None or str(quantization).lower() in {"none", ""}:
        return None
    q = str(quantization).lower()
    if q not in QUANTIZATIONS:
        raise ConfigError(f"quantization {quantization!r} is not supported by the hf engine; use None, '4bit' "
                          "(bitsandbytes NF4) or '8bit' (bitsandbytes LLM.int8)." + close_matches(q, QUANTIZATIONS))
    return q


def load_model(transformers, folder: Path, kwargs: dict, *, local_files_only: bool | None = None):
    """The model in ``folder``; a LoRA adapter folder (``tpru finetune --set merge=false``) is applied to its base.

    The adapter's ``base_model_name_or_path`` is resolved like any model name (alias, Hub id or folder), then the
    adapter is merged into the weights (kept separate on a quantised base, which cannot be merged).
    """
    adapter = Path(folder) / "adapter_config.json"
    if not adapter.is_file() or (Path(folder) / "config.json").is_file():
        return transformers.AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    peft = require("peft", "finetune", what="loading a LoRA adapter")
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter} names no base_model_name_or_path; merge the adapter or add the base's name")
    log.info("loading LoRA adapter %s on its base %s", folder, base)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        hub.locate(base, local_files_only=local_files_only), **kwargs)
    model = peft.PeftModel.from_pretrained(model, str(folder))
    return model if "quantization_config" in kwargs else model.merge_and_unload()


__all__ = ["QUANTIZATIONS", "check_quantization", "load_model", "pick_device", "pick_dtype"]
