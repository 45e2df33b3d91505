"""Multi-GPU / multi-node launch through ``accelerate``, with the DeepSpeed configs shipped in the package.

``tpru finetune --num-gpus 8`` resolves and saves the run's config, then starts one training process per GPU:

    python -m accelerate.commands.launch --config_file <package>/accelerate_configs/ddp.yaml \\
        --num_processes 8 --num_machines 1 --machine_rank 0 --main_process_port 29500 \\
        --module tpru_agent.finetune.train.job --config RUN/config.yaml

``--deepspeed zero2|zero3`` swaps in ``zero2.yaml`` / ``zero3.yaml`` (DeepSpeed must be installed:
``pip install deepspeed``). For several nodes, run the same command on every node with ``--num-nodes M``,
``--node-rank R`` and ``--main-process-ip`` of node 0; ``--num-gpus`` stays the GPUs per node.
Generation runs in vLLM (colocated with training) when vLLM is installed, else in transformers.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

from tpru_agent.errors import ConfigError
from tpru_agent.finetune.train.config import FinetuneConfig

CONFIG_PACKAGE = "tpru_agent.finetune.train"
CONFIG_FOLDER = "accelerate_configs"
#: Environment variables set by torchrun / accelerate inside a launched process.
LAUNCHED_ENV = ("LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")


def accelerate_config(cfg: FinetuneConfig) -> Path:
    """The shipped accelerate config file for this run (``ddp``, ``zero2`` or ``zero3``)."""
    name = cfg.deepspeed or "ddp"
    path = Path(str(importlib.resources.files(CONFIG_PACKAGE).joinpath(CONFIG_FOLDER, f"{name}.yaml")))
    if not path.is_file():  # pragma: no cover - packaging error
        raise ConfigError(f"accelerate config {path} is missing from the installed package; reinstall tpru-agent")
    return path


def needs_launch(cfg: FinetuneConfig) -> bool:
    """True when the run needs several processes and this is not already one of them."""
    return cfg.world_size > 1 and not any(k in os.environ for k in LAUNCHED_ENV)


def launch_command(cfg: FinetuneConfig, config_file: str | os.PathLike, *, resume: bool = False,
                   python: str | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``config_file`` on ``cfg.num_gpus`` x ``cfg.num_nodes``.

    Example:
        >>> cmd = launch_command(FinetuneConfig(data="d", num_gpus=4), "run/config.yaml")
        >>> cmd[cmd.index("--num_processes") + 1]
        '4'
    """
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(accelerate_config(cfg)),
           "--num_processes", str(cfg.world_size),
           "--num_machines", str(cfg.num_nodes),
           "--machine_rank", str(cfg.node_rank),
           "--main_process_port", str(cfg.main_process_port),
           "--mixed_precision", "no" if cfg.bf16 is False else "bf16"]
    if cfg.num_nodes > 1:
        cmd += ["--main_process_ip", str(cfg.main_process_ip)]
    cmd += ["--module", "tpru_agent.finetune.train.job", "--config", str(config_file)]
    if resume:
        cmd.append("--resume")
    return cmd


def check_launchable(cfg: FinetuneConfig) -> None:
    """Fail early, naming the fix, when the launch cannot work here."""
    import importlib.util

    if cfg.peft == "qlora" and cfg.deepspeed == "zero3":
        raise ConfigError("QLoRA with ZeRO-3 is not supported here: use --deepspeed zero2 or no --deepspeed")
    if cfg.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"--deepspeed {cfg.deepspeed} needs the 'deepspeed' package: pip install deepspeed")
