"""``tpru finetune``: train TPRU weights with GRPO (and an optional SFT warm-up) through TRL.

Imports only click / rich / stdlib at module level; training code loads inside the command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

from tpru_agent.cli import render

#: Flags that map one to one onto config keys (``None``: not given, the YAML / default value stays).
_FLAG_KEYS = ("base", "data", "output_dir", "method", "peft", "preset", "max_steps", "learning_rate", "beta",
              "num_generations", "save_steps", "seed", "device", "eval_samples", "num_gpus", "num_nodes", "node_rank",
              "main_process_ip", "deepspeed")


def parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    """``--set key=value`` pairs (repeatable) as a dict; values are typed later against the config fields."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        out[key.strip().replace("-", "_")] = value
    return out


def _quiet_libraries() -> None:
    """The run shows one rich progress bar: silence the libraries' own bars, per-step prints and deprecations."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # TRL passes arguments transformers renamed
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU kernels notice on every import
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # reported later with the extra to install
        pass


@click.command("finetune", context_settings={"show_default": False})
@click.option("--base", default=None, help="Model to start from: a name (qwen2.5-vl-3b, tpru-3b...), Hub id or folder. "
                                           "Default qwen2.5-vl-3b.")
@click.option("--data", default=None, type=click.Path(), help="Dataset folder in the TPRU layout (train/, test/).")
@click.option("--output-dir", "-o", default=None, type=click.Path(), help="Run folder (default runs/tpru); the weights "
                                                                          "land in OUTPUT_DIR/final/.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML config (e.g. examples/tpru-3b.yaml); flags override it.")
@click.option("--method", default=None, type=click.Choice(["grpo", "sft", "sft+grpo"]),
              help="grpo: the paper's recipe; sft: supervised warm-up only; sft+grpo: warm-up, then GRPO.")
@click.option("--peft", default=None, type=click.Choice(["none", "lora", "qlora"]),
              help="Full fine-tuning, LoRA on the language model, or LoRA on a 4-bit base.")
@click.option("--preset", default=None, type=click.Choice(["24gb", "48gb", "80gb"]),
              help="GPU memory preset: picks peft, gradient checkpointing and batch size.")
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (default: 2 epochs).")
@click.option("--learning-rate", "--lr", type=float, default=None, help="Default 1e-6 (paper).")
@click.option("--beta", type=float, default=None, help="KL coefficient (default 0.01; 0 skips the reference model).")
@click.option("--num-generations", type=int, default=None, help="Rollouts per prompt (default 5).")
@click.option("--save-steps", type=int, default=None, help="Checkpoint every N steps (default 50).")
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--eval-samples", type=int, default=None, help="Held-out items scored at the end (0: skip).")
@click.option("--num-gpus", type=int, default=None, help="GPUs per node; >1 launches accelerate.")
@click.option("--num-nodes", type=int, default=None, help="Nodes (run the command on each, with --node-rank).")
@click.option("--node-rank", type=int, default=None)
@click.option("--main-process-ip", default=None, help="Address of node 0 (multi-node).")
@click.option("--deepspeed", default=None, type=click.Choice(["zero2", "zero3"]), help="DeepSpeed ZeRO stage.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Any other config key, e.g. --set top_p=0.95 --set rewards=tpru_partial (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT_DIR from its last checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config, memory estimate and launch command; "
                                              "train nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def finetune(config_file, sets, resume, dry_run, as_json, **flags):
    """Fine-tune a Qwen2.5-VL model with the TPRU recipe (GRPO through TRL).

    \b
    Examples:
      tpru finetune --base qwen2.5-vl-3b --data data/tpru -o runs/3b
      tpru finetune --config examples/tpru-7b.yaml --data data/tpru --num-gpus 8 --deepspeed zero3
      tpru finetune -o runs/3b --resume
    """
    import importlib

    from tpru_agent.finetune.train.config import resolve_config

    # The extra first: without it nothing below can work, and the user should not wait for a model lookup to learn
    # it. A missing module is turned into one line naming the [finetune] extra by the CLI's error handling.
    # (--dry-run too: its config may pass GRPOConfig fields through, which only TRL itself can check)
    for module in ("yaml", "trl", "datasets", "peft") if not dry_run else ("yaml", "trl"):
        importlib.import_module(module)
    overrides = {k: v for k, v in flags.items() if k in _FLAG_KEYS and v is not None}
    overrides.update(parse_sets(sets))
    saved = Path(overrides.get("output_dir") or "runs/tpru") / "config.yaml"
    if resume and config_file is None and saved.is_file():
        config_file = str(saved)  # resume with the run's own settings unless told otherwise
    cfg = resolve_config(config_file, overrides, need_data=not dry_run)
    if dry_run:
        _dry_run(cfg, resume, as_json)
        return
    from tpru_agent.finetune.train.launch import check_launchable, launch_command, needs_launch
    from tpru_agent.hub import locate

    locate(cfg.base, inference=False)  # fail here, with the SDK's message, before any process starts
    if needs_launch(cfg):
        from tpru_agent.finetune.train.job import prepare_run

        check_launchable(cfg)
        out = prepare_run(cfg, resume=resume)
        cmd = launch_command(cfg, out / "config.yaml", resume=resume)
        render.note("launching: " + " ".join(cmd))
        sys.exit(subprocess.call(cmd))
    _quiet_libraries()
    from tpru_agent.finetune.train.job import train

    result = train(cfg, resume=resume, console=render.err_console if cfg.progress else None)
    _show_result(result, as_json)


def _show_result(result, as_json: bool) -> None:
    """The training outcome: JSON, or the weights and held-out accuracy; exit 143 after a SIGTERM."""
    payload = {"status": result.status, "output_dir": str(result.output_dir),
               "final": str(result.final) if result.final else None,
               "checkpoint": str(result.checkpoint) if result.checkpoint else None, "steps": result.steps,
               "evaluation": {k: v for k, v in (result.evaluation or {}).items() if k != "samples"} or None}
    if as_json:
        render.emit_json(payload)
    elif result.status == "finished":
        render.console.print(f"weights: [bold]{result.final}[/]  steps {result.steps}", highlight=False)
        if result.evaluation:
            render.console.print(f"held-out accuracy {result.evaluation['accuracy']:.3f} "
                                 f"(n={result.evaluation['n']})", highlight=False)
        render.note(f"curves: {result.output_dir / 'curves.png'}; model card: {result.final / 'README.md'}")
    if result.status == "interrupted":
        render.warn(f"stopped by SIGTERM; checkpoint {result.checkpoint}. Continue with: tpru finetune "
                    f"-o {result.output_dir} --resume")
        sys.exit(143)


def _dry_run(cfg, resume: bool, as_json: bool) -> None:
    from tpru_agent.finetune.train.launch import launch_command, needs_launch
    from tpru_agent.finetune.train.memory import estimate_for, model_shape

    shape = model_shape(cfg.base)
    estimate = estimate_for(cfg, shape)
    command = launch_command(cfg, Path(cfg.output_dir) / "config.yaml", resume=resume) if needs_launch(cfg) else None
    payload = {"config": cfg.to_dict(), "memory_gib_per_gpu": {k: round(v, 3) for k, v in estimate.items()},
               "memory_model": shape["name"], "launch": command,
               "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
               "generation_batch_size": cfg.generation_batch_size}
    if as_json:
        render.emit_json(payload)
        return
    render.show_table("Resolved config", ["key", "value"], [[k, json.dumps(v)] for k, v in cfg.to_dict().items()])
    render.show_table(f"Estimated GPU memory per GPU, {payload['memory_model']} (GiB)", ["part", "GiB"],
                      [[k, f"{v:.2f}"] for k, v in estimate.items()])
    if not cfg.data:
        render.warn("data is not set: a real run needs --data DIR (a folder in the TPRU layout)")
    if command:
        render.console.print("launch: " + " ".join(command), highlight=False, soft_wrap=True)
