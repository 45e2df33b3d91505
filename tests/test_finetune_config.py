"""Fine-tuning config and presets, data conversion, the batch guard and the paper's GRPO fields (no training).

Launch commands, the ``tpru finetune`` CLI and the run folder are in test_finetune_launch.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tpru_agent.errors import ConfigError
from tpru_agent.finetune.train.config import (
    MODEL_SHAPES,
    PRESET_BUDGET_GIB,
    PRESETS,
    TRL_DEFAULTS,
    FinetuneConfig,
    estimate_for,
    estimate_memory_gib,
    resolve_config,
)
from tpru_agent.sizing import TRAINED_FACTOR, TRAINED_MAX, TRAINED_MIN

REPO = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_paper_recipe():
    cfg = FinetuneConfig(data="d")
    paper = {"method": "grpo", "num_generations": 5, "beta": 0.01, "learning_rate": 1e-6,
             "max_completion_length": 1024, "prompts_per_rollout": 256, "prompts_per_update": 128,
             "min_pixels": TRAINED_MIN, "max_pixels": TRAINED_MAX, "freeze_vision": False, "rewards": ["tpru"],
             "peft": "none"}
    assert {k: getattr(cfg, k) for k in paper} == paper
    passed = {"temperature": 1.0, "top_p": 0.99, "lr_scheduler_type": "constant", "warmup_steps": 0,
              "weight_decay": 0.01, "max_grad_norm": 1.0, "num_train_epochs": 2.0, "epsilon": 0.2, "epsilon_high": 0.3,
              "delta": 3.0}
    assert {k: cfg.trainer_value(k) for k in passed} == passed  # GRPOConfig fields, passed through
    assert cfg.bf16 is None  # auto: bf16 on a GPU that has it
    assert cfg.generation_batch_size == 1280  # 256 prompts x 5 rollouts
    assert cfg.gradient_accumulation_steps == 128  # 640 completions per update / 5 per micro-batch


def test_resolution_order_is_defaults_then_preset_then_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: 24gb\ndata: d\nlearning_rate: 2.0e-6\npeft: lora\nseed: 3\n")
    cfg = resolve_config(path, {"seed": 7, "beta": None})
    assert cfg.gradient_checkpointing is True   # from the preset
    assert cfg.peft == "lora"                   # YAML beats the preset's qlora
    assert cfg.learning_rate == 2e-6            # YAML beats the default
    assert cfg.seed == 7                        # the flag beats YAML
    assert cfg.beta == 0.01                     # a flag left unset (None) changes nothing
    assert resolve_config(overrides={"data": "d", "preset": "80gb"}).peft == "none"


@pytest.mark.parametrize("source, key, hint", [
    ("yaml", "lerning_rate", "learning_rate"),
    ("flags", "num_generation", "num_generations"),
    ("flags", "bta", "beta"),
])
def test_unknown_keys_fail_with_a_close_match(tmp_path, source, key, hint):
    path = None
    overrides = {"data": "d"}
    if source == "yaml":
        path = tmp_path / "c.yaml"
        path.write_text(f"data: d\n{key}: 1\n")
    else:
        overrides[key] = "1"
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'. Did you mean '{hint}'"):
        resolve_config(path, overrides)


@pytest.mark.parametrize("key, raw, value", [
    ("learning_rate", "1e-6", 1e-6),            # YAML 1.1 reads 1e-6 as a string
    ("max_steps", "12", 12),
    ("max_steps", 12.0, 12),
    ("bf16", "false", False),
    ("bf16", "null", None),
    ("gradient_checkpointing", "yes", True),
    ("rewards", "tpru,tpru_partial", ["tpru", "tpru_partial"]),
    ("reward_weights", "1,0.5", [1.0, 0.5]),
    ("preset", "none", None),
    ("peft", "none", "none"),                   # a string value, not null: peft is not nullable
    ("max_train_samples", "~", None),
])
def test_values_are_coerced_to_the_field_type(key, raw, value):
    overrides = {"data": "d", key: raw}
    if key == "reward_weights":
        overrides["rewards"] = ["tpru", "label_density"]
    assert getattr(resolve_config(overrides=overrides), key) == value


@pytest.mark.parametrize("overrides, message", [
    ({"max_steps": "many"}, "max_steps must be int"),
    ({"max_steps": 2.5}, "max_steps must be int"),
    ({"method": "ppo"}, "method must be one of grpo, sft, sft\\+grpo"),
    ({"peft": "lroa"}, "Did you mean 'lora'"),
    ({"num_generations": 1}, "num_generations must be >= 2"),
    ({"per_device_train_batch_size": 3}, "not a multiple of per_device_train_batch_size"),
    ({"prompts_per_rollout": 100, "prompts_per_update": 64}, "must be a multiple of prompts_per_update"),
    ({"min_pixels": 50000}, "min_pixels \\(50000\\) is above max_pixels"),
    ({"top_p": 0}, "top_p must be in"),
    ({"num_nodes": 2}, "main_process_ip"),
    ({"reward_weights": "1,2"}, "reward_weights has 2 values for 1 rewards"),
    ({"data": ""}, "data is not set"),
    ({"rewards": ""}, "rewards is empty"),
    ({"rewards": "tpru,tpru_parital"}, "Did you mean 'tpru_partial'"),
])
def test_invalid_values_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides={"data": "d", **overrides})


def test_saved_config_round_trips(tmp_path):
    cfg = resolve_config(overrides={"data": "d", "peft": "lora", "learning_rate": 3e-6, "rewards": "tpru_partial"})
    path = cfg.save(tmp_path / "run" / "config.yaml")
    assert resolve_config(path) == cfg
    assert yaml.safe_load(path.read_text())["learning_rate"] == 3e-6


@pytest.mark.parametrize("name, base, deepspeed", [("tpru-3b", "qwen2.5-vl-3b", "zero2"),
                                                    ("tpru-7b", "qwen2.5-vl-7b", "zero3")])
def test_examples_reproduce_the_paper_recipe(name, base, deepspeed):
    cfg = resolve_config(REPO / "examples" / f"{name}.yaml", {"data": "d"})
    assert (cfg.base, cfg.deepspeed, cfg.num_gpus, cfg.method, cfg.peft) == (base, deepspeed, 8, "grpo", "none")
    value = cfg.trainer_value
    assert (cfg.num_generations, value("temperature"), value("top_p"), cfg.beta) == (5, 1.0, 0.99, 0.01)
    assert (cfg.learning_rate, value("weight_decay"), value("max_grad_norm"), value("num_train_epochs")) == \
        (1e-6, 0.01, 1.0, 2.0)
    assert cfg.bf16 is True and cfg.freeze_vision is False and cfg.max_completion_length == 1024
    # 256 prompts per rollout and 128 per update over 8 GPUs: 640 completions per update
    assert cfg.per_device_train_batch_size * cfg.world_size * cfg.gradient_accumulation_steps == 640
    assert cfg.generation_batch_size == 1280


@pytest.mark.parametrize("size", ["3b", "7b"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_fit_their_budget_by_the_written_estimate(size, preset):
    cfg = resolve_config(overrides={"data": "d", "preset": preset})
    est = estimate_for(cfg, size)
    budget = PRESET_BUDGET_GIB[preset]
    if size == "7b" and preset == "80gb":  # documented: the 7B full fine-tune needs ZeRO-3 over 4 GPUs
        assert est["total"] > budget
        sharded = estimate_for(resolve_config(overrides={"data": "d", "num_gpus": 4, "deepspeed": "zero3"}), size)
        assert sharded["total"] < budget
    else:
        assert est["total"] < budget
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))


def test_estimate_orders_the_methods_sensibly():
    shape = MODEL_SHAPES["3b"]
    total = {p: estimate_memory_gib(**shape, peft=p, beta=0.01, gradient_checkpointing=True, batch=5)["total"]
             for p in ("none", "lora", "qlora")}
    assert total["qlora"] < total["lora"] < total["none"]
    full = estimate_memory_gib(**shape, peft="none", beta=0.01, gradient_checkpointing=True, batch=5)
    assert full["weights"] == pytest.approx(3.755e9 * 4 / 2 ** 30)  # fp32 master weights
    eight_bit = estimate_memory_gib(**shape, peft="none", beta=0.01, gradient_checkpointing=True, batch=5,
                                    optim="adamw_bnb_8bit")
    assert full["grads+optimizer"] - eight_bit["grads+optimizer"] == pytest.approx(3.755e9 * 6 / 2 ** 30)
    sharded = [estimate_memory_gib(**shape, peft="none", beta=0.01, gradient_checkpointing=True, batch=5,
                                   world_size=8, zero=z) for z in (0, 2, 3)]
    assert sharded[0]["total"] > sharded[1]["total"] > sharded[2]["total"]
    no_ckpt = estimate_memory_gib(**shape, peft="lora", beta=0.01, gradient_checkpointing=False, batch=5)
    assert no_ckpt["activations"] > 5 * estimate_memory_gib(**shape, peft="lora", beta=0.01,
                                                             gradient_checkpointing=True, batch=5)["activations"]


# ----------------------------------------------------------------------------------------------- data
def test_to_messages_interleaves_text_and_image_placeholders_in_order():
    from tpru_agent.finetune.train.inputs import to_messages
    from tpru_agent.tasks import ordering

    problem = ordering.build(4).problem
    [message] = to_messages(problem)
    parts = message["content"]
    assert message["role"] == "user"
    assert [p["type"] for p in parts].count("image") == 4
    assert all(p.get("text") for p in parts if p["type"] == "text")
    text = "".join(p["text"] if p["type"] == "text" else "<image>" for p in parts)
    from tpru_agent.tasks import render_prompt

    assert text == render_prompt(problem)  # the preamble is there, the placeholders where the problem had them


def _write_rows(path, rows):
    from PIL import Image

    from tpru_agent.finetune.data.tpru_format import TPRURow, encode_png, write_parquet

    write_parquet([TPRURow(p, tuple(encode_png(Image.new("RGB", s, (i * 40, 0, 0))) for i, s in enumerate(sizes)),
                           a, task="ordering", episode_id=f"e{k}") for k, (p, sizes, a) in enumerate(rows)], path)


def test_load_split_gives_trl_examples_at_the_pixel_budget(tmp_path):
    from tpru_agent.finetune.train.inputs import load_split, manifest
    from tpru_agent.tasks import ordering

    q4, q3 = ordering.build(4), ordering.build(3)
    _write_rows(tmp_path / "d" / "train" / "part-0.parquet",
                [(q4.problem, [(640, 480)] * 4, "CABD"), (q3.problem, [(60, 40)] * 3, "BAC")])
    ds = load_split(tmp_path / "d", "train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["answer"] == "CABD" and first["row_id"] == 0 and second["row_id"] == 1
    assert [p["type"] for p in first["prompt"][0]["content"]].count("image") == 4 == len(first["images"])
    for image in first["images"] + second["images"]:
        w, h = image.size
        assert TRAINED_MIN * 0.8 <= w * h <= TRAINED_MAX * 1.05 and w % TRAINED_FACTOR == 0 == h % TRAINED_FACTOR
    assert manifest(tmp_path / "d")["splits"] == {"train": 2}
    with pytest.raises(ConfigError, match="has no 'test' split"):
        load_split(tmp_path / "d", "test")
    assert len(load_split(tmp_path / "d", "train", limit=1, cache_dir=str(tmp_path / "cache"))) == 1


def test_sft_targets_state_the_answer_in_the_trained_format():
    from tpru_agent.finetune.train.sft import sft_target
    from tpru_agent.tasks import format_score, tpru_reward

    for answer, task, negative in [("CABD", "ordering", False), ("B", "next", False), ("E", "previous", True),
                                   ("A", "ordering_mcq", False)]:
        text = sft_target(answer, task=task, negative=negative)
        assert tpru_reward(text, answer) == pytest.approx(0.92)  # the warm-up target earns the full reward
        assert format_score(text) == 0.2
    assert "None of the choices provided" in sft_target("E", task="next", negative=True)


# ----------------------------------------------------------------------------------------------- batch guard
def _batch(pad_left=True, tokens=(4, 2), images=(2, 1), grid_rows=None, mm_shift=False):
    import torch

    img = 9
    rows = []
    width = max(tokens) + 3
    for n in tokens:
        body = [1] + [img] * n + [2]
        pad = [0] * (width - len(body))
        rows.append((pad + body, [0] * len(pad) + [1] * len(body)) if pad_left else
                    (body + pad, [1] * len(body) + [0] * len(pad)))
    ids = torch.tensor([r[0] for r in rows])
    mask = torch.tensor([r[1] for r in rows])
    grid = torch.tensor([[1, 2, 4]] * (grid_rows if grid_rows is not None else sum(images)))  # 8 patches -> 2 tokens
    mm = ((ids == img) & (mask == 1)).long()
    if mm_shift:
        mm = torch.roll(mm, 1, dims=1)
    return {"prompt_ids": ids, "prompt_mask": mask, "image_grid_thw": grid, "num_images": list(images),
            "pixel_values": torch.zeros(int(grid.prod(-1).sum()), 4), "mm_token_type_ids": mm}


@pytest.mark.parametrize("kwargs, message", [
    ({}, None),
    ({"pad_left": False}, "not left-padded"),
    ({"tokens": (4, 3)}, "3 image tokens but its 1 images give 2 features"),
    ({"grid_rows": 2}, "image_grid_thw has 2 rows for 3 images"),
    ({"mm_shift": True}, "mm_token_type_ids do not mark the image tokens"),
])
def test_batch_check_table(kwargs, message):
    from tpru_agent.finetune.train.grpo import BatchCheckError, check_multimodal_batch

    batch = _batch(**kwargs)
    if message is None:
        summary = check_multimodal_batch(batch, image_token_id=9, merge_size=2)
        assert summary["image_tokens_per_row"] == summary["features_per_row"] == [4, 2]
        assert summary["images_per_row"] == [2, 1]
    else:
        with pytest.raises(BatchCheckError, match=message):
            check_multimodal_batch(batch, image_token_id=9, merge_size=2)


# ----------------------------------------------------------------------------------------------- paper GRPO
def test_paper_preset_clips_as_the_authors_and_passes_grpo_fields_through(tmp_path):
    from tpru_agent.finetune.train.grpo import grpo_args

    cfg = resolve_config(overrides={"data": "d", "device": "cpu"})
    args = grpo_args(cfg, tmp_path)
    assert (args.epsilon, args.epsilon_high, args.delta) == (0.2, 0.3, 3.0)  # clip_ratio_low / high / dual
    assert cfg.max_prompt_length == 7000
    tuned = resolve_config(overrides={"data": "d", "device": "cpu", "epsilon_high": "0.28", "top_entropy_quantile": "0.2"})
    assert tuned.trl == {**TRL_DEFAULTS, "epsilon_high": 0.28, "top_entropy_quantile": 0.2}
    args = grpo_args(tuned, tmp_path)
    assert args.epsilon_high == 0.28 and args.top_entropy_quantile == 0.2
    saved = tuned.save(tmp_path / "config.yaml")
    assert resolve_config(saved) == tuned  # the trl mapping round-trips through config.yaml


@pytest.mark.parametrize("overrides, message", [
    ({"epsilon_hihg": "0.3"}, "Did you mean 'epsilon_high'"),
    ({"temperatur": "0.7"}, "Did you mean 'temperature'"),
    ({"top_p": "1.5"}, "top_p must be in"),
    ({"temperature": "0"}, "temperature > 0"),
    ({"num_train_epochs": "two"}, "num_train_epochs must be float"),
    ({"trl": {"num_generations": 4}}, "set it at the top level \\(num_generations: ...\\)"),
    ({"generation_batch_size": "8"}, "computed from 'prompts_per_rollout'"),
    ({"delta": "three"}, "delta must be float"),
    ({"trl": "x"}, "trl must be a mapping"),
    ({"max_steps": 0}, "0 would train nothing"),
])
def test_grpo_pass_through_errors_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides={"data": "d", **overrides})


def test_every_difference_from_the_authors_is_recorded_in_the_example_and_the_card():
    from tpru_agent.finetune.train.authors_diff import DIFFERENCES
    from tpru_agent.finetune.train.callbacks import model_card

    example = (REPO / "examples" / "tpru-3b.yaml").read_text()
    card = model_card(resolve_config(overrides={"data": "d"}).to_dict(), base="b", base_path="p", data={},
                      steps={"grpo": 1}, evaluation=None, weights="full")
    for topic, theirs, ours, why in DIFFERENCES:
        assert f"# - {topic}:" in example, topic
        assert f"**{topic}**: authors: {theirs}; here: {ours}. Why: {why}." in card


# ----------------------------------------------------------------------------------------------- pass-through
#: What an earlier ``config.yaml`` held at the top level for fields that are now passed through (non-defaults).
OLD_TOP_LEVEL = {"temperature": 0.7, "top_p": 0.95, "loss_type": "grpo", "scale_rewards": "batch",
                 "lr_scheduler_type": "cosine", "warmup_steps": 5, "weight_decay": 0.0, "max_grad_norm": 0.5,
                 "num_train_epochs": 1.0, "save_total_limit": 2, "logging_steps": 4, "vllm_gpu_memory_utilization": 0.5}


def test_forwarded_fields_are_not_redeclared_and_reach_grpo_config_from_old_yaml_and_set(tmp_path):
    from tpru_agent.finetune.train.grpo import grpo_args

    cfg = FinetuneConfig(data="d")
    assert not any(hasattr(cfg, key) for key in OLD_TOP_LEVEL)  # one home: the pass-through
    old = {**{k: v for k, v in cfg.to_dict().items() if k != "trl"}, **OLD_TOP_LEVEL, "device": "cpu",
           "trl": {"epsilon": 0.2, "epsilon_high": 0.3, "delta": 3.0}}
    path = tmp_path / "old-config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    resolved = resolve_config(path)
    assert resolved.trl == {**TRL_DEFAULTS, **OLD_TOP_LEVEL}
    args = grpo_args(resolved, tmp_path / "o")
    assert {k: getattr(args, k) for k in OLD_TOP_LEVEL if k != "lr_scheduler_type"} == \
        {k: v for k, v in OLD_TOP_LEVEL.items() if k != "lr_scheduler_type"}
    assert args.lr_scheduler_type == "cosine" and (args.epsilon, args.epsilon_high, args.delta) == (0.2, 0.3, 3.0)
    assert resolve_config(resolved.save(tmp_path / "new.yaml")) == resolved  # and the new layout round-trips
    flagged = resolve_config(path, {"temperature": "0.9"})  # --set temperature=0.9 beats the file
    assert flagged.trainer_value("temperature") == 0.9 == grpo_args(flagged, tmp_path / "o").temperature


def test_paper_values_reach_grpo_config_through_the_pass_through(tmp_path):
    from tpru_agent.finetune.train.grpo import grpo_args

    args = grpo_args(resolve_config(overrides={"data": "d", "device": "cpu"}), tmp_path / "o")
    expected = {k: v for k, v in TRL_DEFAULTS.items() if k != "lr_scheduler_type"}
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.lr_scheduler_type == "constant" and args.logging_steps == 1  # TRL's own: linear, 10


def test_trainer_value_falls_back_to_trl_and_names_the_fix():
    import dataclasses

    from trl import GRPOConfig

    cfg = FinetuneConfig(data="d", trl={"temperature": 0.5})
    assert cfg.trl == {**TRL_DEFAULTS, "temperature": 0.5}  # a partial mapping keeps the recipe's other values
    trl_default = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}["num_iterations"]
    assert "num_iterations" not in cfg.trl and cfg.trainer_value("num_iterations") == trl_default
    with pytest.raises(ConfigError, match="read cfg.beta"):
        cfg.trainer_value("beta")
    with pytest.raises(ConfigError, match="Did you mean 'num_iterations'"):
        cfg.trainer_value("num_iteration")
    with pytest.raises(ConfigError, match="set it at the top level"):
        FinetuneConfig(data="d", trl={"learning_rate": 1e-5}).validate()


def test_sft_stage_gets_the_shared_pass_through_fields_only(tmp_path):
    from tpru_agent.finetune.train.sft import sft_args

    cfg = resolve_config(overrides={"data": "d", "device": "cpu", "method": "sft", "warmup_steps": "20",
                                    "save_total_limit": "2", "weight_decay": "0.1", "sft_epochs": "3",
                                    "loss_type": "grpo", "epsilon": "0.1"})
    args = sft_args(cfg, tmp_path / "o")
    assert (args.warmup_steps, args.save_total_limit, args.weight_decay, args.max_grad_norm) == (20, 2, 0.1, 1.0)
    assert args.lr_scheduler_type == "constant" and args.logging_steps == 1   # the paper's, as GRPO sees them
    assert args.num_train_epochs == 3.0            # sft_epochs, not the GRPO stage's num_train_epochs
    assert args.loss_type == "nll"                 # GRPO's loss_type means something else to SFTConfig
