"""Options of the transformers engine, checked before any weights load: prompt content, device, dtype, quantisation.

Example:
    >>> check_quantization("none") is None
    True
"""

from __future__ import annotations

from ..errors import ConfigError, close_matches
from ..tasks.question import IMAGE

QUANTIZATIONS = ("4bit", "8bit")
_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def split_prompt(text: str, n_images: int) -> list[dict]:
    """One user turn's content: text parts interleaved with ``{"type": "image"}`` at each ``<image>``.

    Raises:
        ConfigError: the placeholder count differs from ``n_images``.

    Example:
        >>> split_prompt("A: <image> B: <image>", 2)[1]
        {'type': 'image'}
    """
    parts = text.split(IMAGE)
    if len(parts) - 1 != n_images:
        raise ConfigError(
            f"the prompt has {len(parts) - 1} {IMAGE} placeholder(s) but {n_images} image(s) were given; "
            f"put exactly one {IMAGE} in the text per image, in order"
        )
    content: list[dict] = []
    for i, part in enumerate(parts):
        if part:
            content.append({"type": "text", "text": part})
        if i < n_images:
            content.append({"type": "image"})
    return content


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


def check_quantization(quantization: str | None) -> str | None:
    """``None`` / ``"none"`` -> ``None``; ``"4bit"`` / ``"8bit"`` kept; anything else is a :class:`ConfigError`."""
    if quantization is None or str(quantization).lower() in {"none", ""}:
        return None
    q = str(quantization).lower()
    if q not in QUANTIZATIONS:
        raise ConfigError(f"quantization {quantization!r} is not supported by the hf engine; use None, '4bit' "
                          "(bitsandbytes NF4) or '8bit' (bitsandbytes LLM.int8)." + close_matches(q, QUANTIZATIONS))
    return q


__all__ = ["QUANTIZATIONS", "check_quantization", "pick_device", "pick_dtype", "split_prompt"]
