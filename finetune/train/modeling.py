"""Load the base model and processor for training, wrap LoRA / QLoRA, and write the final weights.

LoRA targets the language model's projections only (a ``re.fullmatch`` pattern: the vision MLP has layers with
the same names); QLoRA loads the base in 4-bit NF4 (bitsandbytes) with the vision tower and the LM head left
unquantised. The final folder is a complete transformers checkpoint that ``TPRU(path)`` loads: merged weights
(default; LoRA / QLoRA adapters are merged into a full-precision copy of the base), or, with ``merge: false``,
the adapter files plus the processor and a note.

Why a loader of its own beside the hf engine's (:mod:`tpru_agent.engines.hf`): training loads the base differently
(fp32 master weights for full fine-tuning, :func:`train_dtype`; 4-bit NF4 with a per-rank device map for QLoRA,
:func:`quantization_config`; the vision tower frozen; the processor at the training budget, left padded), and
serving does none of that. What a model folder must pass before either loads it is shared:
:func:`tpru_agent.hub.check_model_files` (no remote code, safetensors only).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tpru_agent.errors import ConfigError, require
from tpru_agent.finetune.train.config import FinetuneConfig
from tpru_agent.fsutil import atomic_dir, atomic_path, write_json
from tpru_agent.hub import check_model_files
from tpru_agent.sizing import BUDGET_FILE

log = logging.getLogger(__name__)

#: Written next to the final weights: what produced them (read by the model card and by people).
PROVENANCE = "tpru_finetune.json"


def use_cuda(cfg: FinetuneConfig) -> bool:
    """True when training runs on CUDA (``device: auto`` picks CUDA when present)."""
    torch = require("torch", "finetune", what="fine-tuning")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is visible; use --device cpu or auto")
    return cfg.device != "cpu" and torch.cuda.is_available()


def use_bf16(cfg: FinetuneConfig) -> bool:
    """bf16 on a GPU that supports it unless set explicitly (the paper trains in bf16)."""
    if cfg.bf16 is not None:
        return cfg.bf16
    if not use_cuda(cfg):
        return False
    import torch

    return torch.cuda.is_bf16_supported()


def gradient_checkpointing(cfg: FinetuneConfig) -> bool:
    """On for GPU runs unless set explicitly; off on CPU (tiny models gain nothing from it)."""
    return cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else use_cuda(cfg)


def load_processor(path: str | os.PathLike, cfg: FinetuneConfig):
    """The base's processor, rounding only, with left padding (generation needs it).

    The frames reach it already sized at the run's budget (``inputs.load_split``: TPRU's two steps), so its own
    range is the checkpoint processor's wide one, as in the authors' EasyR1 runs and in hf serving: set to the
    budget, its ``smart_resize`` would shrink every served size over ``max_pixels`` once rounded (224x168 ->
    196x140, 35 visual tokens instead of 48). The run's budget travels in ``tpru_budget.json``.
    """
    from tpru_agent.sizing import PROCESSOR_MAX_PIXELS, PROCESSOR_MIN_PIXELS

    transformers = require("transformers", "finetune", what="fine-tuning")
    processor = transformers.AutoProcessor.from_pretrained(str(path), padding_side="left", trust_remote_code=False)
    # Qwen2-VL's image processor reads its range from ``size`` (min_pixels / max_pixels kwargs are deprecated)
    processor.image_processor.size = {"shortest_edge": PROCESSOR_MIN_PIXELS, "longest_edge": PROCESSOR_MAX_PIXELS}
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def quantization_config(cfg: FinetuneConfig):
    """bitsandbytes NF4 settings for QLoRA (``None`` for other methods)."""
    if cfg.peft != "qlora":
        return None
    require("bitsandbytes", "quant", what="QLoRA (peft: qlora)")
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if use_bf16(cfg) else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute,
                              llm_int8_skip_modules=["visual", "lm_head"])


def train_dtype(cfg: FinetuneConfig):
    """Weights dtype while training: fp32 master weights for full fine-tuning (bf16 compute through autocast).

    At lr 1e-6 an AdamW update is ~1e-6 of a weight, far below bf16's ~4e-3 relative resolution: pure-bf16
    weights would round every update away. A frozen LoRA base can stay in bf16 (the adapters train in fp32).
    """
    import torch

    if cfg.peft == "none" or not use_bf16(cfg):
        return torch.float32
    return torch.bfloat16


def load_model(path: str | os.PathLike, cfg: FinetuneConfig):
    """The base model for training (:func:`train_dtype`), 4-bit for QLoRA, vision frozen on request / with PEFT.

    Raises:
        ModelNotFoundError: a remote-code model or pickle weights (:func:`tpru_agent.hub.check_model_files`, the
            check inference runs too); only safetensors are loaded.
    """
    require("torch", "finetune", what="fine-tuning")
    transformers = require("transformers", "finetune", what="fine-tuning")
    check_model_files(path)
    kwargs: dict[str, Any] = {"dtype": train_dtype(cfg), "trust_remote_code": False, "use_safetensors": True}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quant = quantization_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if use_cuda(cfg):
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    if cfg.freeze_vision or cfg.peft != "none":
        visual = getattr(getattr(model, "model", model), "visual", None)
        if visual is not None:
            visual.requires_grad_(False)
    return model


def lora_config(cfg: FinetuneConfig):
    """A peft ``LoraConfig`` over the language model's projections (``None`` without peft)."""
    if cfg.peft == "none":
        return None
    peft = require("peft", "finetune", what="LoRA / QLoRA")
    return peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target, task_type="CAUSAL_LM", bias="none")


def check_lora_targets(model, cfg: FinetuneConfig) -> list[str]:
    """Module names the LoRA pattern wraps; raises when it wraps none or touches the vision tower."""
    import re

    pattern = re.compile(cfg.lora_target)
    names = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    if not names:
        raise ConfigError(f"lora_target {cfg.lora_target!r} matches no module of the base model; it is matched "
                          "in full against names like 'model.language_model.layers.0.self_attn.q_proj'")
    vision = [n for n in names if ".visual." in n]
    if vision:
        raise ConfigError(f"lora_target matches vision modules ({vision[0]}, ...): restrict it to the language model")
    return names


def merge_adapter(base_path: str | os.PathLike, adapter_dir: str | os.PathLike, cfg: FinetuneConfig):
    """The base in full precision with the adapter merged in (QLoRA adapters merge into the unquantised base)."""
    torch = require("torch", "finetune", what="merging LoRA weights")
    peft = require("peft", "finetune", what="merging LoRA weights")
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    check_model_files(base_path)
    base = AutoModelForImageTextToText.from_pretrained(str(base_path), dtype=dtype, trust_remote_code=False,
                                                       use_safetensors=True)
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def write_final(trainer, processor, cfg: FinetuneConfig, base_path: str | os.PathLike, target: str | os.PathLike,
                provenance: dict[str, Any]) -> Path:
    """Write the final weights to ``target`` (atomically): merged full weights, or adapter + processor + note.

    Must be called on every process (the trainer gathers sharded weights); only the main process writes.
    """
    target = Path(target)
    adapter = cfg.peft != "none"
    staging = target.with_name(f".{target.name}.stage")
    trainer.save_model(str(staging))  # gathers ZeRO-3 / FSDP shards; PEFT models save the adapter only
    if not trainer.accelerator.is_main_process:
        return target
    with atomic_dir(target) as tmp:  # fsync'ed, with the usual file modes (safetensors writes its files 0600)
        if adapter and cfg.merge:
            merged = merge_adapter(base_path, staging, cfg)
            merged.save_pretrained(str(tmp), safe_serialization=True)
            del merged
        else:
            for item in staging.iterdir():
                if item.name != "training_args.bin":  # a pickle: never shipped (safetensors only)
                    shutil.move(str(item), tmp / item.name)
            if not adapter and use_bf16(cfg):
                cast_checkpoint(tmp, "bfloat16")  # fp32 master weights -> the release dtype (half the size)
        processor.save_pretrained(str(tmp))
        if adapter and not cfg.merge:
            _point_adapter_at(tmp, cfg.base)
        write_json(tmp / PROVENANCE, dict(provenance, weights="adapter" if adapter and not cfg.merge else "full"),
                   default=str)
        # the budget the model was trained at: TPRU(path) serves it at the same size (train as served)
        write_json(tmp / BUDGET_FILE, {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels})
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cast_checkpoint(folder: str | os.PathLike, dtype: str = "bfloat16") -> None:
    """Rewrite a checkpoint's floating-point safetensors in ``dtype`` (config and shard index updated)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    target = getattr(torch, dtype)
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in load_file(str(file)).items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        with atomic_path(file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    for name, update in (("config.json", None), ("model.safetensors.index.json", total)):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if update is None:
            data["dtype"] = dtype
            data.pop("torch_dtype", None)
        else:
            data.setdefault("metadata", {})["total_size"] = update
        write_json(path, data)


def _point_adapter_at(folder: Path, base: str) -> None:
    """Record the base by the name the user gave (a Hub name resolves anywhere; a temp path would not)."""
    file = folder / "adapter_config.json"
    if file.is_file():
        config = json.loads(file.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base
        write_json(file, config)
