"""The fine-tuning configuration: one dataclass, paper defaults, YAML file < CLI flags, memory presets.

Defaults reproduce the TPRU recipe (paper, section "Reward and training"): GRPO without an SFT stage, vision tower
trainable, 5 rollouts per prompt at temperature 1.0 / top-p 0.99, KL (k3) coefficient 0.01, lr 1e-6 constant,
AdamW with weight decay 0.01, grad clip 1.0, bf16 on GPU, 2 epochs, responses up to 1,024 tokens, prompts over
7,000 tokens left out, 256 prompts per rollout and 128 per update, clipping 0.2 / 0.3 with dual clip 3.0 (the
authors' EasyR1 ``clip_ratio_low / high / dual``; TRL's ``epsilon / epsilon_high / delta``), frames at
16,384..36,864 pixels. Everything is overridable.

Any field of TRL's ``GRPOConfig`` that this dataclass does not declare is passed through as is: a YAML key or
``--set epsilon_high=0.28`` lands in :attr:`FinetuneConfig.trl` (typed against ``GRPOConfig``'s own field types),
which starts from :data:`PAPER_TRL`.

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
from tpru_agent.fsutil import write_text
from tpru_agent.sizing import TRAINED_MAX, TRAINED_MIN

METHODS = ("grpo", "sft", "sft+grpo")
PEFTS = ("none", "lora", "qlora")
DEEPSPEED = ("zero2", "zero3")
#: What SFT trains the assistant to write: a one-sentence reasoning + the answer block, or the answer block alone.
SFT_TARGETS = ("reasoning", "answer")
#: Language-model projections only: the vision MLP has gate_proj / up_proj / down_proj too, so names alone would
#: also wrap the vision tower. Matched with ``re.fullmatch`` against module names (transformers 5 layout).
#: GRPOConfig fields the paper preset sets (EasyR1 ``clip_ratio_low 0.2``, ``clip_ratio_high 0.3``,
#: ``clip_ratio_dual 3.0``): TRL's ``delta`` caps the ratio of negative-advantage tokens at 3, as dual-clip PPO does.
PAPER_TRL: dict[str, Any] = {"epsilon": 0.2, "epsilon_high": 0.3, "delta": 3.0}
#: GRPOConfig fields ``grpo_args`` computes from this config: set the named key instead.
DERIVED_TRL = {"gradient_accumulation_steps": "prompts_per_update", "generation_batch_size": "prompts_per_rollout",
               "steps_per_generation": "prompts_per_rollout", "use_cpu": "device", "output_dir": "output_dir",
               "data_seed": "seed"}
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
    min_pixels: int = TRAINED_MIN
    max_pixels: int = TRAINED_MAX
    max_prompt_length: int | None = 7000
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
    generation_chunk_size: int | None = None
    trl: dict[str, Any] = field(default_factory=lambda: dict(PAPER_TRL))
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
    sft_target: str = "reasoning"
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

    def validate(self, *, need_data: bool = True) -> FinetuneConfig:
        """Check values and their combinations; returns ``self`` (``need_data=False``: a dry run may omit data).

        Raises:
            ConfigError: naming the key, the value and the accepted values or the fix.
        """
        _choice("method", self.method, METHODS)
        _choice("peft", self.peft, PEFTS)
        _choice("sft_target", self.sft_target, SFT_TARGETS)
        if self.preset is not None:
            _choice("preset", self.preset, tuple(PRESETS))
        if self.deepspeed is not None:
            _choice("deepspeed", self.deepspeed, DEEPSPEED)
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        if need_data and not self.data:
            raise ConfigError("data is not set: pass --data DIR (a folder in the TPRU layout: train/*.parquet, "
                              "test/*.parquet), e.g. one built by `tpru data build`")
        for key in ("num_generations", "prompts_per_rollout", "prompts_per_update", "per_device_train_batch_size",
                    "max_completion_length", "save_steps", "logging_steps", "num_gpus", "num_nodes", "sft_batch_size",
                    "lora_r", "min_pixels", "max_pixels", "sft_gradient_accumulation_steps", "max_prompt_length",
                    "generation_chunk_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_steps == 0 or self.sft_max_steps == 0:
            raise ConfigError("max_steps / sft_max_steps must be >= 1, or -1 for whole epochs; 0 would train nothing")
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
        from tpru_agent.finetune.train.rewards import REWARDS

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
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
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


def _trl_hints() -> dict[str, Any]:
    """Field types of TRL's ``GRPOConfig`` (empty when TRL is not installed)."""
    try:
        from trl import GRPOConfig
    except ImportError:
        return {}
    return typing.get_type_hints(GRPOConfig)


def _split_trl(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate our keys from GRPOConfig pass-through keys (typed against GRPOConfig); ``trl:`` maps merge in.

    Raises:
        ConfigError: a key that is neither ours nor GRPOConfig's (with close matches from both), or a GRPOConfig
            key this config computes (naming the key to set instead).
    """
    ours, passed = {}, {}
    nested = values.get("trl") or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"trl must be a mapping of TRL GRPOConfig fields, got {nested!r}")
    hints = None
    for key, value in [*((k, v) for k, v in values.items() if k != "trl"), *nested.items()]:
        if key in _FIELDS and key not in nested:
            ours[key] = value
            continue
        hints = _trl_hints() if hints is None else hints
        if key in DERIVED_TRL:
            raise ConfigError(f"{key} is computed from {DERIVED_TRL[key]!r}; set that instead")
        if key not in hints:
            raise ConfigError(f"unknown config key {key!r}.{close_matches(key, [*_FIELDS, *hints])} Valid keys: "
                              f"{', '.join(_FIELDS)}, or any field of TRL's GRPOConfig")
        passed[key] = _coerce_as(key, value, hints[key])
    return ours, passed


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML / CLI value to the field's type (``"1e-6"`` -> 1e-06, ``"null"`` -> None).

    Raises:
        ConfigError: unknown key (with a suggestion) or a value of the wrong type.
    """
    if key not in _FIELDS:
        raise ConfigError(f"unknown config key {key!r}.{close_matches(key, _FIELDS)} Valid keys: "
                          f"{', '.join(_FIELDS)}")
    return _coerce_as(key, value, _HINTS[key])


def _coerce_as(key: str, value: Any, hint) -> Any:
    allowed = _hint_types(hint)
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
                return [_LIST_ITEM.get(key, str)(v) for v in items]
            if tp is dict and isinstance(value, dict):
                return dict(value)
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


def resolve_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None, *,
                   need_data: bool = True) -> FinetuneConfig:
    """Defaults < preset < YAML file < overrides (CLI flags); validated (``need_data=False``: data may be unset).

    Args:
        path: optional YAML file.
        overrides: keys set explicitly (flags the user gave); ``None`` values are ignored.

    Raises:
        ConfigError: unknown keys, wrong types, invalid combinations.
    """
    file_values, file_trl = _split_trl(load_yaml(path) if path else {})
    flag_values, flag_trl = _split_trl({k: v for k, v in (overrides or {}).items() if v is not None})
    from_file = {k: coerce(k, v) for k, v in file_values.items()}
    from_flags = {k: coerce(k, v) for k, v in flag_values.items()}
    explicit = {**from_file, **from_flags}
    explicit["trl"] = {**PAPER_TRL, **file_trl, **flag_trl}
    values: dict[str, Any] = {}
    preset = explicit.get("preset")
    if preset is not None:
        _choice("preset", preset, tuple(PRESETS))
        values.update(PRESETS[preset])
    values.update(explicit)
    return FinetuneConfig(**values).validate(need_data=need_data)


from tpru_agent.finetune.train.memory import MODEL_SHAPES, estimate_for, estimate_memory_gib, model_shape  # noqa: E402,F401  (old home)
