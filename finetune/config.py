"""The fine-tuning configuration: one dataclass, paper defaults, YAML file < CLI flags, memory presets.

Defaults reproduce the TPRU recipe (paper, section "Reward and training"): GRPO without an SFT stage, vision tower
trainable, 5 rollouts per prompt at temperature 1.0 / top-p 0.99, KL (k3) coefficient 0.01, lr 1e-6 constant,
AdamW with weight decay 0.01, grad clip 1.0, bf16 on GPU, 2 epochs, responses up to 1,024 tokens, 256 prompts
per rollout and 128 per update, frames at 16,384..36,864 pixels. Everything is overridable.

Resolution order: dataclass defaults < preset (``--preset``) < YAML file (``--config``) < CLI flags. Unknown keys
fail with a close-match suggestion; the resolved config is written to the run folder as ``config.yaml`` and is
itself a valid ``--config`` file.

Example:
    >>> cfg = resolve_config(overrides={"data": "data/tpru", "max_steps": 10})
    >>> cfg.num_generations, cfg.beta, cfg.learning_rate
    (5, 0.01, 1e-06)
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpru_agent.errors import ConfigError, close_matches

METHODS = ("grpo", "sft", "sft+grpo")
PEFTS = ("none", "lora", "qlora")
DEEPSPEED = ("zero2", "zero3")
#: Language-model projections only: the vision MLP has gate_proj / up_proj / down_proj too, so names alone would
#: also wrap the vision tower. Matched with ``re.fullmatch`` against module names (transformers 5 layout).
LORA_TARGET = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class FinetuneConfig:
    """Every knob of ``tpru finetune``; field names are the YAML keys and (with ``-`` for ``_``) the CLI flags."""

    # what to train, on what, where
    base: str = "qwen2.5-vl-3b"
    data: str = ""
    output_dir: str = "runs/tpru"
    method: str = "grpo"
    peft: str = "none"
    preset: str | None = None
    # data
    train_split: str = "train"
    eval_split: str = "test"
    max_train_samples: int | None = None
    eval_samples: int = 64
    eval_steps: int = 0
    eval_max_new_tokens: int = 1024
    template: str | None = None
    data_cache_dir: str | None = None
    min_pixels: int = 16384
    max_pixels: int = 36864
    # GRPO (TPRU recipe)
    num_generations: int = 5
    temperature: float = 1.0
    top_p: float = 0.99
    beta: float = 0.01
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    max_completion_length: int = 1024
    prompts_per_rollout: int = 256
    prompts_per_update: int = 128
    rewards: list[str] = field(default_factory=lambda: ["tpru"])
    reward_weights: list[float] | None = None
    # optimisation
    learning_rate: float = 1e-6
    optim: str = "adamw_torch"
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    num_train_epochs: float = 2.0
    max_steps: int = -1
    per_device_train_batch_size: int = 5
    freeze_vision: bool = False
    gradient_checkpointing: bool | None = None
    bf16: bool | None = None
    device: str = "auto"
    attn_implementation: str | None = None
    seed: int = 0
    # runs and faults
    save_steps: int = 50
    save_total_limit: int = 3
    logging_steps: int = 1
    progress: bool = True
    # peft
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_target: str = LORA_TARGET
    merge: bool = True
    # supervised warm-up (method sft / sft+grpo)
    sft_learning_rate: float = 1e-5
    sft_epochs: float = 1.0
    sft_max_steps: int = -1
    sft_batch_size: int = 4
    sft_gradient_accumulation_steps: int = 1
    # scale-out
    num_gpus: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500
    deepspeed: str | None = None
    use_vllm: bool | None = None
    vllm_gpu_memory_utilization: float = 0.3

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer update: ``prompts_per_update`` prompts x ``num_generations`` completions."""
        per_step = self.per_device_train_batch_size * self.world_size
        return max(1, self.prompts_per_update * self.num_generations // per_step)

    @property
    def generation_batch_size(self) -> int:
        """Completions generated per rollout (TRL's ``generation_batch_size``)."""
        return self.prompts_per_rollout * self.num_generations

    def validate(self) -> FinetuneConfig:
        """Check values and their combinations; returns ``self``.

        Raises:
            ConfigError: naming the key, the value and the accepted values or the fix.
        """
        _choice("method", self.method, METHODS)
        _choice("peft", self.peft, PEFTS)
        if self.preset is not None:
            _choice("preset", self.preset, tuple(PRESETS))
        if self.deepspeed is not None:
            _choice("deepspeed", self.deepspeed, DEEPSPEED)
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        if not self.data:
            raise ConfigError("data is not set: pass --data DIR (a folder in the TPRU layout: train/*.parquet, "
                              "test/*.parquet), e.g. one built by `tpru data build`")
        for key in ("num_generations", "prompts_per_rollout", "prompts_per_update", "per_device_train_batch_size",
                    "max_completion_length", "save_steps", "logging_steps", "num_gpus", "num_nodes", "sft_batch_size",
                    "lora_r", "min_pixels", "max_pixels", "sft_gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (GRPO compares rollouts of one prompt), "
                              f"got {self.num_generations}")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels ({self.min_pixels}) is above max_pixels ({self.max_pixels})")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.beta < 0 or self.temperature <= 0:
            raise ConfigError(f"beta must be >= 0 and temperature > 0, got beta={self.beta}, "
                              f"temperature={self.temperature}")
        completions = self.prompts_per_update * self.num_generations
        per_step = self.per_device_train_batch_size * self.world_size
        if completions % per_step:
            raise ConfigError(
                f"prompts_per_update x num_generations = {completions} completions per update is not a multiple of "
                f"per_device_train_batch_size x GPUs = {per_step}; change per_device_train_batch_size "
                f"(e.g. {self.num_generations}) or prompts_per_update")
        if self.prompts_per_rollout % self.prompts_per_update:
            raise ConfigError(f"prompts_per_rollout ({self.prompts_per_rollout}) must be a multiple of "
                              f"prompts_per_update ({self.prompts_per_update}): each rollout feeds whole updates")
        from .rewards import REWARDS

        if not self.rewards:
            raise ConfigError(f"rewards is empty; use one or more of {', '.join(REWARDS)} "
                              "(or 'package.module:function')")
        for name in self.rewards:
            if name not in REWARDS and ":" not in name:
                _choice("rewards", name, tuple(REWARDS))
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards")
        if self.num_nodes > 1 and not self.main_process_ip:
            raise ConfigError("num_nodes > 1 needs main_process_ip (the address of the node with node_rank 0)")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ConfigError(f"node_rank must be in 0..{self.num_nodes - 1}, got {self.node_rank}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain values, in field order (what ``config.yaml`` holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as YAML atomically; the file is a valid ``--config`` input."""
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
        return path


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


def estimate_for(cfg: FinetuneConfig, size: str | None = None) -> dict[str, float]:
    """:func:`estimate_memory_gib` for a config; ``size`` ``"3b"`` / ``"7b"`` (guessed from the base name when None)."""
    size = size or ("7b" if "7b" in cfg.base.lower() else "3b")
    zero = {"zero2": 2, "zero3": 3}.get(cfg.deepspeed or "", 0)
    return estimate_memory_gib(**MODEL_SHAPES[size], peft=cfg.peft, beta=cfg.beta,
                               gradient_checkpointing=cfg.gradient_checkpointing is not False,
                               batch=cfg.per_device_train_batch_size, completion_tokens=cfg.max_completion_length,
                               lora_r=cfg.lora_r, optim=cfg.optim, world_size=cfg.world_size, zero=zero)


#: Shapes of the supported bases (Qwen2.5-VL model cards; parameters counted on the meta device).
MODEL_SHAPES = {
    "3b": dict(params_b=3.755, layers=36, hidden=2048, intermediate=11008, kv_dim=256, vocab=151936),
    "7b": dict(params_b=8.29, layers=28, hidden=3584, intermediate=18944, kv_dim=512, vocab=152064),
}


# ----------------------------------------------------------------------------------------------- resolution
def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}."
                          f"{close_matches(str(value), choices)}")


_FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}


def _hint_types(tp) -> tuple:
    """The concrete types a field accepts (``bool | None`` -> ``(bool, NoneType)``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(arg for a in typing.get_args(tp) for arg in _hint_types(a))
    return (origin or tp,)


_HINTS = typing.get_type_hints(FinetuneConfig)
_LIST_ITEM = {"rewards": str, "reward_weights": float}


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML / CLI value to the field's type (``"1e-6"`` -> 1e-06, ``"null"`` -> None).

    Raises:
        ConfigError: unknown key (with a suggestion) or a value of the wrong type.
    """
    if key not in _FIELDS:
        raise ConfigError(f"unknown config key {key!r}.{close_matches(key, _FIELDS)} Valid keys: "
                          f"{', '.join(_FIELDS)}")
    allowed = _hint_types(_HINTS[key])
    nullable = type(None) in allowed
    if value is None or (nullable and isinstance(value, str) and value.strip().lower() in {"none", "null", "~", ""}):
        if nullable:
            return None
        raise ConfigError(f"{key} cannot be empty (null)")
    for tp in allowed:
        if tp is type(None):
            continue
        try:
            if tp is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.strip().lower() in {"true", "yes", "1", "on", "false", "no", "0",
                                                                         "off"}:
                    return value.strip().lower() in {"true", "yes", "1", "on"}
                continue
            if tp is int and not isinstance(value, bool):
                if isinstance(value, float) and not value.is_integer():
                    continue
                return int(value)
            if tp is float and not isinstance(value, bool):
                return float(value)
            if tp is str:
                return str(value)
            if tp is list:
                items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
                return [_LIST_ITEM[key](v) for v in items]
        except (TypeError, ValueError):
            continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file (a mapping of config keys).

    Raises:
        ConfigError: missing file, invalid YAML, or not a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def resolve_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """Defaults < preset < YAML file < overrides (CLI flags); validated.

    Args:
        path: optional YAML file.
        overrides: keys set explicitly (flags the user gave); ``None`` values are ignored.

    Raises:
        ConfigError: unknown keys, wrong types, invalid combinations.
    """
    from_file = {k: coerce(k, v) for k, v in (load_yaml(path) if path else {}).items()}
    from_flags = {k: coerce(k, v) for k, v in (overrides or {}).items() if v is not None}
    explicit = {**from_file, **from_flags}
    values: dict[str, Any] = {}
    preset = explicit.get("preset")
    if preset is not None:
        _choice("preset", preset, tuple(PRESETS))
        values.update(PRESETS[preset])
    values.update(explicit)
    return FinetuneConfig(**values).validate()
