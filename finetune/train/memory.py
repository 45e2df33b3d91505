"""Planning estimates of GPU memory per GRPO micro-step, for ``tpru finetune --dry-run``, and the per-GPU memory
presets (``--preset``, :data:`PRESETS`) they size.

The estimate follows the model being trained: :func:`model_shape` reads the shape from the model folder's
``config.json`` and counts the parameters from the safetensors headers (no weights are loaded); a Hub name that is
not on disk falls back to the published Qwen2.5-VL-3B / -7B shapes by name.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any


def estimate_memory_gib(*, params_b: float, layers: int, hidden: int, intermediate: int, kv_dim: int,
                        vocab: int, peft: str, beta: float, gradient_checkpointing: bool, batch: int,
                        prompt_tokens: int = 2500, completion_tokens: int = 1024, lora_r: int = 64,
                        optim: str = "adamw_torch", world_size: int = 1, zero: int = 0) -> dict[str, float]:
    """Peak GPU memory of one GRPO micro-step, by part (GiB); a planning estimate, not a measurement.

    Bytes per parameter. Full fine-tuning: fp32 master weights 4, fp32 gradients 4, AdamW moments 8 (8-bit
    AdamW: 2), and, with the KL term, a bf16 reference copy 2. LoRA / QLoRA: the frozen base in bf16 (2) or NF4
    (0.6, counting the unquantised vision tower and embeddings); adapters train in fp32 (4 + 4 + 8); the reference
    is the base with adapters disabled (no copy). ZeRO-2 divides gradients and optimizer states by the GPU count,
    ZeRO-3 also the weights and the reference. Activations: with checkpointing, one hidden state per layer and
    token (2 bytes x hidden) plus one layer's working set (~34 x hidden x 2 bytes per token); without, every
    layer's working set. Log-probs: fp32 logits over the completion tokens (vocab x 4 bytes per token). KV cache for
    generation: 2 x layers x kv_dim x 2 bytes per token. Plus 1.5 GiB CUDA context and 10% fragmentation.
    """
    gib = 1024 ** 3
    n = params_b * 1e9
    tokens = batch * (prompt_tokens + completion_tokens)
    state_shard = world_size if zero >= 2 else 1
    weight_shard = world_size if zero >= 3 else 1
    adam = 2.0 if "8bit" in optim else 8.0
    parts: dict[str, float] = {}
    if peft == "none":
        parts["weights"] = n * 4.0 / weight_shard
        parts["grads+optimizer"] = n * (4 + adam) / state_shard
        parts["reference"] = n * 2.0 / weight_shard if beta > 0 else 0.0
    else:
        parts["weights"] = n * (0.6 if peft == "qlora" else 2.0) / weight_shard
        lora = layers * lora_r * (2 * hidden + 2 * (hidden + kv_dim) + 2 * hidden + 3 * (hidden + intermediate))
        parts["grads+optimizer"] = lora * (4 + 4 + adam) / state_shard
        parts["reference"] = 0.0
    per_layer = 34 * hidden * 2
    parts["activations"] = tokens * (layers * hidden * 2 + per_layer if gradient_checkpointing
                                     else layers * per_layer)
    parts["logits"] = batch * completion_tokens * vocab * 4
    parts["kv_cache"] = tokens * 2 * layers * kv_dim * 2
    out = {k: v / gib for k, v in parts.items()}
    out["overhead"] = 1.5 + 0.1 * sum(out.values())
    out["total"] = sum(out.values())
    return out


def estimate_for(cfg, size: str | dict | None = None) -> dict[str, float]:
    """:func:`estimate_memory_gib` for a config.

    ``size``: ``"3b"`` / ``"7b"``, a shape dict (:func:`model_shape`), or ``None`` to take the shape of
    ``cfg.base`` itself.
    """
    shape = size if isinstance(size, dict) else MODEL_SHAPES[size] if size else model_shape(cfg.base)
    shape = {k: v for k, v in shape.items() if k in _SHAPE_KEYS}
    zero = {"zero2": 2, "zero3": 3}.get(cfg.deepspeed or "", 0)
    return estimate_memory_gib(**shape, peft=cfg.peft, beta=cfg.beta,
                               gradient_checkpointing=cfg.gradient_checkpointing is not False,
                               batch=cfg.per_device_train_batch_size, completion_tokens=cfg.max_completion_length,
                               lora_r=cfg.lora_r, optim=cfg.optim, world_size=cfg.world_size, zero=zero)


_SHAPE_KEYS = ("params_b", "layers", "hidden", "intermediate", "kv_dim", "vocab")


def model_shape(base: str | os.PathLike) -> dict[str, Any]:
    """The shape of ``base`` for the estimate, with ``"name"`` saying what it describes.

    A local folder (or a Hub name already in the cache) is read from its ``config.json`` and safetensors headers;
    otherwise a name containing ``7b`` / ``3b`` takes the published shape. Raises nothing: an unreadable folder
    falls back to the name.
    """
    folder = _local_folder(base)
    if folder is not None:
        try:
            return _shape_from_folder(folder)
        except (OSError, ValueError, KeyError, struct.error):
            pass
    size = "7b" if "7b" in str(base).lower() else "3b"
    return {**MODEL_SHAPES[size], "name": f"Qwen2.5-VL-{size.upper()} (by name)"}


def _local_folder(base) -> Path | None:
    path = Path(str(base)).expanduser()
    if (path / "config.json").is_file():
        return path
    try:
        from tpru_agent.hub import locate

        return locate(base, local_files_only=True)
    except Exception:  # not cached, or no huggingface_hub: the name decides
        return None


def _shape_from_folder(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    params = sum(_safetensors_numel(f) for f in folder.glob("*.safetensors"))
    if not params:
        raise ValueError(f"{folder} has no safetensors weights to count")
    return {"params_b": params / 1e9, "layers": text["num_hidden_layers"], "hidden": text["hidden_size"],
            "intermediate": text["intermediate_size"],
            "kv_dim": text.get("num_key_value_heads", heads) * head_dim,
            "vocab": text.get("vocab_size") or config["vocab_size"],
            "name": f"{folder.name} ({params / 1e6:,.1f}M parameters, from its config.json)"}


def _safetensors_numel(file: Path) -> int:
    """Elements in a safetensors file, from its JSON header (the weights are not read)."""
    with open(file, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        n = 1
        for dim in info["shape"]:
            n *= dim
        total += n
    return total


#: Shapes of the supported bases (Qwen2.5-VL model cards; parameters counted on the meta device).
MODEL_SHAPES = {
    "3b": dict(params_b=3.755, layers=36, hidden=2048, intermediate=11008, kv_dim=256, vocab=151936),
    "7b": dict(params_b=8.29, layers=28, hidden=3584, intermediate=18944, kv_dim=512, vocab=152064),
}


# ----------------------------------------------------------------------------------------------- memory presets
#: Per-GPU memory presets. Each sets peft, gradient checkpointing, the micro-batch and (80gb) the optimizer; the
#: estimate behind each is :func:`estimate_memory_gib` (see its docstring) for Qwen2.5-VL-3B / -7B with 5 rollouts
#: of <= 1,024 tokens after a ~2,500-token prompt (7 frames at the TPRU budget + text), one GPU, GiB:
#:
#: ========  ====================================  ===========  ===========  ==============================
#: preset    settings                              3B estimate  7B estimate  cards
#: ========  ====================================  ===========  ===========  ==============================
#: ``24gb``  qlora, checkpointing, batch 5         14.8         21.5         RTX 3090/4090, A10, L4
#: ``48gb``  lora, checkpointing, batch 5          20.2         33.4         A6000, L40S
#: ``80gb``  full, checkpointing, batch 5, 8-bit   60.6         127.6        A100/H100 80GB (3B)
#:           AdamW
#: ========  ====================================  ===========  ===========  ==============================
#:
#: Full fine-tuning keeps fp32 master weights (bf16 compute): at the paper's lr of 1e-6 an update is far below
#: bf16's resolution (~4e-3 relative), so pure-bf16 weights would not move. That costs 16 bytes per parameter with
#: AdamW (60 GiB for the 3B before activations), hence 8-bit AdamW moments in the one-GPU ``80gb`` preset. The 7B
#: trains fully only sharded: ``--num-gpus 4 --deepspeed zero3`` (~49 GiB per GPU with AdamW; examples/tpru-7b.yaml
#: uses 8 GPUs); or use ``48gb`` (LoRA) on one card. Regenerate the table with :func:`estimate_memory_gib`.
PRESETS: dict[str, dict[str, Any]] = {
    "24gb": {"peft": "qlora", "gradient_checkpointing": True, "per_device_train_batch_size": 5},
    "48gb": {"peft": "lora", "gradient_checkpointing": True, "per_device_train_batch_size": 5},
    "80gb": {"peft": "none", "gradient_checkpointing": True, "per_device_train_batch_size": 5,
             "optim": "adamw_bnb_8bit"},
}
PRESET_BUDGET_GIB = {"24gb": 24, "48gb": 48, "80gb": 80}
