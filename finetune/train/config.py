"""The fine-tuning configuration: one dataclass, paper defaults, YAML file < CLI flags, memory presets.

Defaults reproduce the TPRU recipe (paper, section "Reward and training"): GRPO without an SFT stage, vision tower
trainable, 5 rollouts per prompt, KL (k3) coefficient 0.01, lr 1e-6, bf16 on GPU, responses up to 1,024 tokens,
prompts over 7,000 tokens left out, 256 prompts per rollout and 128 per update, frames at 16,384..36,864 pixels
(declared fields, below); sampling at temperature 1.0 / top-p 0.99, a constant lr without warm-up, AdamW weight
decay 0.01, grad clip 1.0, 2 epochs, clipping 0.2 / 0.3 with dual clip 3.0 (TRL fields passed through, from
:data:`TRL_DEFAULTS`). Everything is overridable.

The dataclass declares only what this project computes with or decides: batch arithmetic, the memory estimate, the
run folder, auto device choices (``None``), the DeepSpeed preset name, the held-out cadence, the CLI flags. Any other
field of TRL's ``GRPOConfig`` is passed through as is: a YAML key or ``--set temperature=0.7`` lands in
:attr:`FinetuneConfig.trl` (typed against ``GRPOConfig``'s own field types), which starts from :data:`TRL_DEFAULTS`;
read one with :meth:`FinetuneConfig.trainer_value`. The SFT warm-up receives the ``TrainingArguments`` ones too.

Resolution order: dataclass defaults < preset (``--preset``) < YAML file (``--config``) < CLI flags. Unknown keys
fail with a close-match suggestion; the resolved config is written to the run folder as ``config.yaml`` and is
itself a valid ``--config`` file.

Example:
    >>> cfg = resolve_config(overrides={"data": "data/tpru", "max_steps": 10})
    >>> cfg.num_generations, cfg.beta, cfg.learning_rate
    (5, 0.01, 1e-06)
    >>> cfg.trainer_value("temperature"), cfg.trainer_value("lr_scheduler_type"), cfg.trl["epsilon_high"]
    (1.0, 'constant', 0.3)
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpru_agent.errors import ConfigError, close_matches, require
from tpru_agent.finetune.train.memory import (  # noqa: F401  (estimate_*, model_shape: their old home)
    MODEL_SHAPES,
    PRESET_BUDGET_GIB,
    PRESETS,
    estimate_for,
    estimate_memory_gib,
    model_shape,
)
from tpru_agent.finetune.train.values import coerce_as
from tpru_agent.fsutil import write_text
from tpru_agent.sizing import TRAINED_MAX, TRAINED_MIN

METHODS = ("grpo", "sft", "sft+grpo")
PEFTS = ("none", "lora", "qlora")
DEEPSPEED = ("zero2", "zero3")
#: What SFT trains the assistant to write: a one-sentence reasoning + the answer block, or the answer block alone.
SFT_TARGETS = ("reasoning", "answer")
#: TRL ``GRPOConfig`` fields this project only forwards, and the values the pass-through starts from (a YAML key
#: or ``--set key=value`` replaces one). Paper: TPRU, section "Reward and training"; authors: their EasyR1 configs.
TRL_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0, "top_p": 0.99,                   # paper: 5 rollouts at temperature 1.0 / top-p 0.99
    "loss_type": "dapo",                                 # token mean over the update (authors_diff: loss aggregation)
    "scale_rewards": "group",                            # advantage (reward - group mean) / group std, as the authors
    # authors: clip_ratio_low 0.2 / clip_ratio_high 0.3 / clip_ratio_dual 3.0; TRL's delta caps the ratio of
    # negative-advantage tokens at 3, as dual-clip PPO does
    "epsilon": 0.2, "epsilon_high": 0.3, "delta": 3.0,
    "lr_scheduler_type": "constant", "warmup_steps": 0,  # paper: lr 1e-6 constant, no warm-up
    "weight_decay": 0.01, "max_grad_norm": 1.0,          # paper: AdamW with weight decay 0.01, grad clip 1.0
    "num_train_epochs": 2.0,                             # paper: 2 epochs (the SFT warm-up counts sft_epochs)
    "save_total_limit": 3,                               # authors: the last 3 checkpoints kept
    "logging_steps": 1,                                  # ours: a metrics.jsonl record every step (TRL: 10)
    "vllm_gpu_memory_utilization": 0.3,                  # ours: vLLM colocated at 30% (authors: 60%, TP 2)
}
#: GRPOConfig fields ``grpo_args`` computes from this config: set the named key instead.
DERIVED_TRL = {"gradient_accumulation_steps": "prompts_per_update", "generation_batch_size": "prompts_per_rollout",
               "steps_per_generation": "prompts_per_rollout", "use_cpu": "device", "output_dir": "output_dir",
               "data_seed": "seed"}
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
    min_pixels: int = TRAINED_MIN
    max_pixels: int = TRAINED_MAX
    max_prompt_length: int | None = 7000
    # GRPO (TPRU recipe)
    num_generations: int = 5
    beta: float = 0.01
    max_completion_length: int = 1024
    prompts_per_rollout: int = 256
    prompts_per_update: int = 128
    rewards: list[str] = field(default_factory=lambda: ["tpru"])
    reward_weights: list[float] | None = None
    generation_chunk_size: int | None = None
    trl: dict[str, Any] = field(default_factory=lambda: dict(TRL_DEFAULTS))  # GRPOConfig fields passed through
    # optimisation
    learning_rate: float = 1e-6
    optim: str = "adamw_torch"
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

    def __post_init__(self):
        self.trl = {**TRL_DEFAULTS, **(self.trl or {})}  # a partial mapping keeps the recipe's other values

    def trainer_value(self, key: str) -> Any:
        """What TRL's trainer gets for pass-through field ``key``: this config's value, else ``GRPOConfig``'s default.

        Raises:
            ConfigError: ``key`` is declared here (read the attribute), or is no ``GRPOConfig`` field.
        """
        if key in _FIELDS:
            raise ConfigError(f"{key} is a FinetuneConfig field, not a pass-through one: read cfg.{key}")
        if key in self.trl:
            return self.trl[key]
        return _trl_default(key)

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
                    "max_completion_length", "save_steps", "num_gpus", "num_nodes", "sft_batch_size",
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
        self._validate_passed()
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

    def _validate_passed(self) -> None:
        """Checks on the pass-through that TRL itself makes late (at training) or not at all."""
        taken = sorted(k for k in self.trl if k in _FIELDS or k in DERIVED_TRL)
        if taken:
            key = taken[0]
            raise ConfigError(f"trl: {key} is not passed through: " + (
                f"it is computed from {DERIVED_TRL[key]!r}; set that instead" if key in DERIVED_TRL else
                f"set it at the top level ({key}: ...), where this config computes with it"))
        top_p, temperature = self.trainer_value("top_p"), self.trainer_value("temperature")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        if self.beta < 0 or temperature <= 0:
            raise ConfigError(f"beta must be >= 0 and temperature > 0, got beta={self.beta}, "
                              f"temperature={temperature}")
        if self.trainer_value("logging_steps") <= 0:
            raise ConfigError(f"logging_steps must be > 0 (steps, or below 1 a fraction of the run), got "
                              f"{self.trainer_value('logging_steps')}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, in field order (what ``config.yaml`` holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as YAML atomically; the file is a valid ``--config`` input."""
        import yaml

        path = Path(path)
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


# ----------------------------------------------------------------------------------------------- resolution
def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}."
                          f"{close_matches(str(value), choices)}")


_FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
_HINTS = typing.get_type_hints(FinetuneConfig)
_LIST_ITEM = {"rewards": str, "reward_weights": float}


def _trl_hints() -> dict[str, Any]:
    """Field types of TRL's ``GRPOConfig`` (empty when TRL is not installed)."""
    try:
        from trl import GRPOConfig
    except ImportError:
        return {}
    return typing.get_type_hints(GRPOConfig)


def _trl_default(key: str) -> Any:
    """``GRPOConfig``'s own default for ``key``.

    Raises:
        ConfigError: no such ``GRPOConfig`` field (with a close match).
    """
    fields = {f.name: f for f in dataclasses.fields(require("trl", "finetune", what="TRL's defaults").GRPOConfig)}
    if key not in fields:
        raise ConfigError(f"{key!r} is not a field of TRL's GRPOConfig.{close_matches(key, fields)}")
    f = fields[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


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
    for key, value, top in [*((k, v, True) for k, v in values.items() if k != "trl"),
                            *((k, v, False) for k, v in nested.items())]:
        if key in _FIELDS and top:
            ours[key] = value
            continue
        if key in _FIELDS:
            raise ConfigError(f"trl: {key} is not passed through: set it at the top level ({key}: ...), where this "
                              "config computes with it")
        hints = _trl_hints() if hints is None else hints
        if key in DERIVED_TRL:
            raise ConfigError(f"{key} is computed from {DERIVED_TRL[key]!r}; set that instead")
        if key not in hints:
            raise ConfigError(f"unknown config key {key!r}.{close_matches(key, [*_FIELDS, *hints])} Valid keys: "
                              f"{', '.join(_FIELDS)}, or any field of TRL's GRPOConfig")
        passed[key] = coerce_as(key, value, hints[key])
    return ours, passed


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML / CLI value to the field's type (``"1e-6"`` -> 1e-06, ``"null"`` -> None).

    Raises:
        ConfigError: unknown key (with a suggestion) or a value of the wrong type.
    """
    if key not in _FIELDS:
        raise ConfigError(f"unknown config key {key!r}.{close_matches(key, _FIELDS)} Valid keys: "
                          f"{', '.join(_FIELDS)}")
    return coerce_as(key, value, _HINTS[key], item=_LIST_ITEM.get(key, str))



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
    explicit["trl"] = {**TRL_DEFAULTS, **file_trl, **flag_trl}
    values: dict[str, Any] = {}
    preset = explicit.get("preset")
    if preset is not None:
        _choice("preset", preset, tuple(PRESETS))
        values.update(PRESETS[preset])
    values.update(explicit)
    return FinetuneConfig(**values).validate(need_data=need_data)

