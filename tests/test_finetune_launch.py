"""Fine-tuning launch commands, the ``tpru finetune`` CLI (dry runs, errors) and the run folder (no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tpru_agent.errors import ConfigError
from tpru_agent.finetune.train.config import FinetuneConfig, estimate_for, resolve_config

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- launch
@pytest.mark.parametrize("overrides, processes, config_name", [
    ({"num_gpus": 4}, 4, "ddp.yaml"),
    ({"num_gpus": 8, "deepspeed": "zero2"}, 8, "zero2.yaml"),
    ({"num_gpus": 8, "num_nodes": 2, "node_rank": 1, "main_process_ip": "10.0.0.1", "deepspeed": "zero3"}, 16,
     "zero3.yaml"),
])
def test_launch_command_is_what_accelerate_parses(overrides, processes, config_name):
    from accelerate.commands.launch import launch_command_parser

    from tpru_agent.finetune.train.launch import launch_command

    cfg = resolve_config(overrides={"data": "d", **overrides})
    cmd = launch_command(cfg, "run/config.yaml", resume=True, python="python3")
    assert cmd[:3] == ["python3", "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(cmd[3:])
    assert args.num_processes == processes
    assert args.num_machines == cfg.num_nodes and args.machine_rank == cfg.node_rank
    assert Path(args.config_file).name == config_name and Path(args.config_file).is_file()
    assert args.module and args.training_script == "tpru_agent.finetune.train.job"
    assert args.training_script_args == ["--config", "run/config.yaml", "--resume"]
    assert (args.main_process_ip == "10.0.0.1") == (cfg.num_nodes > 1)


@pytest.mark.parametrize("name, kind, stage", [("ddp", "MULTI_GPU", None), ("zero2", "DEEPSPEED", 2),
                                              ("zero3", "DEEPSPEED", 3)])
def test_shipped_accelerate_configs_load_in_accelerate(name, kind, stage):
    from accelerate.commands.config.config_args import load_config_from_file

    from tpru_agent.finetune.train.launch import accelerate_config

    path = accelerate_config(FinetuneConfig(data="d", deepspeed=None if name == "ddp" else name))
    assert path.name == f"{name}.yaml"
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type.name == kind and loaded.mixed_precision == "bf16"
    assert loaded.deepspeed_config.get("zero_stage") == stage


def test_training_entry_point_parses_its_own_arguments():
    from tpru_agent.finetune.train.job import main

    with pytest.raises(SystemExit):  # argparse: --config is required
        main([])


def test_needs_launch_only_for_several_processes_outside_a_launched_one(monkeypatch):
    from tpru_agent.finetune.train.launch import check_launchable, needs_launch

    for key in ("LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert not needs_launch(FinetuneConfig(data="d"))
    assert needs_launch(FinetuneConfig(data="d", num_gpus=2))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not needs_launch(FinetuneConfig(data="d", num_gpus=2))
    with pytest.raises(ConfigError, match="QLoRA with ZeRO-3"):
        check_launchable(FinetuneConfig(data="d", peft="qlora", deepspeed="zero3"))
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match="pip install deepspeed"):
            check_launchable(FinetuneConfig(data="d", deepspeed="zero2"))
    check_launchable(FinetuneConfig(data="d", num_gpus=2))  # plain data parallel needs nothing extra


# ----------------------------------------------------------------------------------------------- CLI
def _cli(args, **env):
    from click.testing import CliRunner

    from tpru_agent.cli.main import cli

    return CliRunner().invoke(cli, args, env=env or None, catch_exceptions=False)


def test_cli_dry_run_shows_resolved_config_memory_and_launch(tmp_path):
    out = tmp_path / "run"
    result = _cli(["finetune", "--config", str(REPO / "examples" / "tpru-7b.yaml"), "--data", "d", "-o", str(out),
                   "--set", "top_p=0.95", "--set", "temperature=0.7", "--lr", "2e-6", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["config"]["learning_rate"] == 2e-6 and "top_p" not in payload["config"]
    passed = payload["config"]["trl"]  # the effective GRPOConfig values passed through: flags, file, paper preset
    assert (passed["top_p"], passed["temperature"], passed["weight_decay"], passed["epsilon_high"]) == \
        (0.95, 0.7, 0.01, 0.3)
    assert payload["memory_model"].startswith("Qwen2.5-VL-7B") and 0 < payload["memory_gib_per_gpu"]["total"] < 80
    assert payload["launch"][payload["launch"].index("--num_processes") + 1] == "8"
    assert payload["launch"][-2:] == ["--config", str(out / "config.yaml")]
    assert not out.exists()  # a dry run writes nothing


def test_cli_rejects_unknown_keys_with_a_suggestion():
    result = _cli(["finetune", "--data", "d", "--set", "num_generation=4", "--dry-run"])
    assert result.exit_code == 1
    assert "Did you mean 'num_generations'" in result.output


def test_cli_offline_base_fails_with_the_sdk_message(tmp_path):
    from tpru_agent.errors import ModelNotFoundError
    from tpru_agent.hub import locate

    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    result = _cli(["finetune", "--base", "qwen2.5-vl-3b", "--data", str(tmp_path), "-o", str(tmp_path / "r")], **env)
    assert result.exit_code == 1
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with pytest.raises(ModelNotFoundError) as info:
            locate("qwen2.5-vl-3b")
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in result.output and "HF_HUB_OFFLINE" in result.output
    assert " ".join(str(info.value).split())[:60] in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------- run folder
def test_model_card_and_curves(tmp_path):
    from tpru_agent.finetune.train.callbacks import append_jsonl, model_card, plot_curves, read_jsonl, truncate_jsonl

    metrics = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        append_jsonl(metrics, {"stage": "grpo", "step": step, "reward": 0.1 * step, "accuracy": 0.05 * step,
                               "kl": 0.001 * step, "loss": 0.0})
    append_jsonl(metrics, {"stage": "grpo", "step": 3, "eval_accuracy": 0.4})
    with open(metrics, "a") as handle:
        handle.write('{"stage": "grpo", "st')  # a torn line from a crash
    assert len(read_jsonl(metrics)) == 4
    png = plot_curves(metrics, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    truncate_jsonl(metrics, "grpo", 2)
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2]
    card = model_card(FinetuneConfig(data="d").to_dict(), base="qwen2.5-vl-3b", base_path="/m",
                      data={"path": "/d", "splits": {"train": 10}, "manifest": {"seed": 0}},
                      steps={"grpo": 3}, evaluation={"n": 10, "accuracy": 0.4, "accuracy_ci": (0.17, 0.69),
                                                     "format": 0.9, "by_task": {"ordering": 0.4}},
                      weights="full")
    for needle in ("qwen2.5-vl-3b", "grpo 3", "splits {'train': 10}", "**0.400**", "TPRU(", "beta=0.01",
                   "data manifest", "temperature=1.0, top_p=0.99", "lr_scheduler_type=constant, weight_decay=0.01",
                   "'epsilon_high': 0.3"):
        assert needle in card


def test_help_example_for_the_7b_runs_as_a_dry_run_without_data():
    """The --help example (8 GPUs, ZeRO-3) resolves and prints its launch even before --data is chosen."""
    result = _cli(["finetune", "--config", str(REPO / "examples" / "tpru-7b.yaml"), "--num-gpus", "8",
                   "--deepspeed", "zero3", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert "zero3.yaml" in " ".join(payload["launch"]) and payload["config"]["data"] == ""
    from tpru_agent.cli.finetune_cmd import finetune

    assert "--config examples/tpru-7b.yaml --data" in finetune.help


def test_dry_run_memory_estimate_follows_the_model_folder(tiny_checkpoint):
    """A 1M-parameter folder gets its own estimate (from config.json and the safetensors headers), not the 3B's."""
    result = _cli(["finetune", "--base", str(tiny_checkpoint), "--dry-run", "--json"])
    payload = json.loads(result.output)
    assert payload["memory_model"].startswith("tiny (") and "from its config.json" in payload["memory_model"]
    three_b = estimate_for(resolve_config(overrides={"data": "d"}), "3b")
    assert payload["memory_gib_per_gpu"]["weights"] < 0.01 < three_b["weights"]
    from tpru_agent.finetune.train.memory import model_shape

    shape = model_shape(tiny_checkpoint)
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(tiny_checkpoint / "model.safetensors").values())
    assert shape["params_b"] == pytest.approx(params / 1e9)
