"""Run a fine-tuning job end to end: stages (SFT warm-up, GRPO), checkpoints, resume, final weights, model card.

``train(cfg)`` is what ``tpru finetune`` calls in a single process; under ``accelerate launch`` every process runs
``python -m tpru_agent.finetune.train.job --config RUN/config.yaml`` (see :mod:`tpru_agent.finetune.train.launch`).

Stages: ``grpo`` (the paper's recipe), ``sft`` (supervised warm-up only), ``sft+grpo`` (warm-up, then GRPO from the
warm-up's merged weights). Each stage checkpoints under ``OUTPUT_DIR/<stage>/`` every ``save_steps`` steps and on
SIGTERM; ``resume=True`` skips finished stages and continues the current one from its last checkpoint, with the
same step count and data order (the sampler is seeded and the trainer skips the batches already seen).

Example:
    >>> result = train(resolve_config(overrides={"base": "qwen2.5-vl-3b", "data": "data/tpru"}))  # doctest: +SKIP
    >>> result.final                                                                               # doctest: +SKIP
    PosixPath('runs/tpru/final')
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpru_agent.errors import ConfigError, TPRUError
from tpru_agent.finetune.train.config import FinetuneConfig, resolve_config

log = logging.getLogger(__name__)

DONE = "done.json"


@dataclass
class RunResult:
    """What a run produced. ``status`` is ``"finished"`` or ``"interrupted"`` (SIGTERM; resume to continue)."""

    status: str
    output_dir: Path
    final: Path | None = None
    checkpoint: Path | None = None
    steps: dict[str, int] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: prompts left out, rollout fitted


def stages(method: str) -> list[str]:
    return {"grpo": ["grpo"], "sft": ["sft"], "sft+grpo": ["sft", "grpo"]}[method]


def prepare_run(cfg: FinetuneConfig, *, resume: bool) -> Path:
    """Create (or check) the run folder and save the resolved config.

    Raises:
        ConfigError: the folder holds an earlier run and ``resume`` is off (nothing is overwritten silently).
    """
    out = Path(cfg.output_dir)
    earlier = [p for p in (out / "grpo", out / "sft", out / "final") if p.exists()]
    if earlier and not resume:
        raise ConfigError(f"{str(out)!r} already holds a run ({earlier[0].name}/); pass --resume to continue it, "
                          "or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    return out


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train(cfg: FinetuneConfig, *, resume: bool = False, console=None) -> RunResult:
    """Train as configured; returns where the weights are (or the checkpoint to resume from).

    Raises:
        ModelNotFoundError: the base cannot be found (offline and not cached: the SDK's message).
        ConfigError: bad data folder or settings.
    """
    from tpru_agent.hub import locate

    cfg.validate()
    base_path = locate(cfg.base)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != cfg.world_size:
        raise ConfigError(f"the config asks for {cfg.world_size} processes (num_gpus x num_nodes) but "
                          f"{world} are running; start it through `tpru finetune`, which launches accelerate")
    out = prepare_run(cfg, resume=resume) if _is_main() else Path(cfg.output_dir)
    result = RunResult("finished", out)
    current_base = base_path
    plan = stages(cfg.method)
    for i, stage in enumerate(plan):
        last = i == len(plan) - 1
        stage_dir = out / stage
        done = stage_dir / DONE
        if resume and done.is_file():
            info = json.loads(done.read_text(encoding="utf-8"))
            result.steps[stage] = info["steps"]
            current_base = Path(info["weights"])
            result.evaluation = info.get("evaluation") or result.evaluation
            result.data[stage] = info.get("data") or {}
            log.info("stage %s already finished (%d steps); skipping", stage, info["steps"])
            continue
        target = out / "final" if last else stage_dir / "model"
        status = _run_stage(cfg, stage, current_base, stage_dir, target, result, resume=resume, console=console,
                            final=last)
        if status != "finished":
            result.status = status
            return result
        current_base = target
    if result.status == "finished":
        result.final = out / "final"
    return result


class NoTrainingError(TPRUError, RuntimeError):
    """A stage ended after zero optimizer steps: nothing was trained, so no weights are written."""


@dataclass
class _Stage:
    """What one stage works with: the data, the processor, the callbacks and where its records go."""

    processor: Any
    train_set: Any
    eval_set: Any
    cfg: FinetuneConfig
    data_report: dict[str, Any]
    metrics_path: Path
    rollouts_path: Path


def _run_stage(cfg: FinetuneConfig, stage: str, base_path: Path, stage_dir: Path, target: Path, result: RunResult,
               *, resume: bool, console, final: bool) -> str:
    from tpru_agent.finetune.train.callbacks import SigtermCallback, checkpoint_step, last_checkpoint, truncate_jsonl

    out = Path(cfg.output_dir)
    checkpoint = last_checkpoint(stage_dir) if resume else None
    if _is_main():
        for path in (out / "metrics.jsonl", out / "rollouts.jsonl"):
            if path.exists():
                truncate_jsonl(path, stage, checkpoint_step(checkpoint))
    ctx = _prepare(cfg, stage, base_path)
    sigterm = SigtermCallback()
    trainer, evaluate = _build_trainer(ctx, stage, base_path, stage_dir, sigterm, console)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    steps = trainer.state.global_step
    result.steps[stage] = steps
    if sigterm.stopped:
        result.checkpoint = last_checkpoint(stage_dir)
        return "interrupted"
    if steps == 0:
        raise NoTrainingError(
            f"the {stage} stage ran 0 optimizer steps on {len(ctx.train_set)} training rows; nothing was trained "
            f"and no weights were written. Set --max-steps N, or add training data")
    _finish(ctx, stage, trainer, evaluate, base_path, stage_dir, target, result, final)
    return "finished"


def _prepare(cfg: FinetuneConfig, stage: str, base_path: Path) -> _Stage:
    """Processor, training split (overlong prompts left out; the GRPO rollout fitted to it) and held-out split."""
    from tpru_agent.finetune.train import inputs as data_mod
    from tpru_agent.finetune.train.modeling import load_processor

    out = Path(cfg.output_dir)
    processor = load_processor(base_path, cfg)
    split_kwargs: dict[str, Any] = dict(template=cfg.template, min_pixels=cfg.min_pixels,
                                        max_pixels=cfg.max_pixels, cache_dir=cfg.data_cache_dir)
    report: dict[str, Any] = {}
    completion = None
    if stage == "sft":
        from tpru_agent.finetune.train.sft import sft_target

        completion = functools.partial(sft_target, style=cfg.sft_target)
    train_set = data_mod.load_split(cfg.data, cfg.train_split, limit=cfg.max_train_samples, completion_fn=completion,
                                    processor=processor, max_prompt_length=cfg.max_prompt_length, report=report,
                                    **split_kwargs)
    if stage == "grpo":
        from tpru_agent.finetune.train.grpo import fit_rollout

        cfg, note = fit_rollout(cfg, len(train_set))
        if note:
            log.warning("%s", note)
            report["fitted"] = note
    eval_set = None
    if cfg.eval_samples > 0 and data_mod.has_split(cfg.data, cfg.eval_split) and cfg.world_size == 1:
        eval_set = data_mod.load_split(cfg.data, cfg.eval_split, limit=cfg.eval_samples, **split_kwargs)
    return _Stage(processor, train_set, eval_set, cfg, report, out / "metrics.jsonl", out / "rollouts.jsonl")


def _build_trainer(ctx: _Stage, stage: str, base_path: Path, stage_dir: Path, sigterm, console):
    """The stage's TRL trainer with the run's callbacks; returns it and the held-out evaluation function."""
    from tpru_agent.finetune.train.callbacks import (
        HeldoutCallback,
        MetricsCallback,
        PlotCallback,
        ProgressCallback,
        append_jsonl,
    )
    from tpru_agent.finetune.train.modeling import load_model

    cfg = ctx.cfg
    model = load_model(base_path, cfg)
    if cfg.peft != "none":
        from tpru_agent.finetune.train.modeling import check_lora_targets

        check_lora_targets(model, cfg)
    metrics = MetricsCallback(ctx.metrics_path, stage)
    callbacks = [metrics, sigterm, PlotCallback(ctx.metrics_path, Path(cfg.output_dir) / "curves.png")]
    if cfg.progress:
        callbacks.append(ProgressCallback(metrics, stage, console=console))

    def evaluate(m):
        from tpru_agent.finetune.eval.heldout import evaluate_generation

        return evaluate_generation(m, ctx.processor, ctx.eval_set, limit=cfg.eval_samples,
                                   max_new_tokens=cfg.eval_max_new_tokens)

    if ctx.eval_set is not None and cfg.eval_steps > 0:
        callbacks.append(HeldoutCallback(cfg.eval_steps, evaluate, metrics))
    if stage == "sft":
        from tpru_agent.finetune.train.sft import build_sft_trainer

        trainer = build_sft_trainer(cfg, model, ctx.processor, ctx.train_set, output_dir=stage_dir,
                                    callbacks=callbacks)
    else:
        from tpru_agent.finetune.train.grpo import build_grpo_trainer

        def on_rollout(step: int, rows: list, summary: dict) -> None:
            if _is_main():
                append_jsonl(ctx.rollouts_path, {"stage": stage, "step": step, "rows": rows,
                                                 "image_tokens": summary.get("image_tokens_per_row"),
                                                 "features": summary.get("features_per_row")})

        trainer = build_grpo_trainer(cfg, model, ctx.processor, ctx.train_set, output_dir=stage_dir,
                                     callbacks=callbacks, on_rollout=on_rollout)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl and the progress line, not stdout
    return trainer, evaluate


def _finish(ctx: _Stage, stage: str, trainer, evaluate, base_path: Path, stage_dir: Path, target: Path,
            result: RunResult, final: bool) -> None:
    """Held-out evaluation (last stage), final weights, model card and the stage's done marker."""
    from tpru_agent.finetune.train.callbacks import append_jsonl, plot_curves
    from tpru_agent.finetune.train.modeling import write_final

    cfg, steps = ctx.cfg, trainer.state.global_step
    evaluation = None
    if ctx.eval_set is not None and final:
        evaluation = evaluate(trainer.model)
        result.evaluation = evaluation
        if _is_main():
            append_jsonl(ctx.metrics_path, {"stage": stage, "step": steps, "eval_accuracy": evaluation["accuracy"],
                                            "eval_format": evaluation["format"], "final": True})
    result.data[stage] = ctx.data_report
    provenance = {"base": cfg.base, "base_path": str(base_path), "method": cfg.method, "stage": stage,
                  "peft": cfg.peft, "steps": dict(result.steps), "evaluation": evaluation,
                  "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels, "data": dict(result.data)}
    write_final(trainer, ctx.processor, cfg if final else _merged(cfg), base_path, target, provenance)
    if _is_main():
        if final:
            _write_card(cfg, target, base_path, result)
        plot_curves(ctx.metrics_path, Path(cfg.output_dir) / "curves.png")
        (stage_dir / DONE).write_text(json.dumps({"steps": steps, "weights": str(target), "evaluation": evaluation,
                                                  "data": ctx.data_report}), encoding="utf-8")


def _merged(cfg: FinetuneConfig) -> FinetuneConfig:
    """A warm-up stage always hands full (merged) weights to the next stage."""
    from dataclasses import replace

    return replace(cfg, merge=True)


def _write_card(cfg: FinetuneConfig, final: Path, base_path: Path, result: RunResult) -> None:
    from tpru_agent.finetune.train.callbacks import model_card
    from tpru_agent.finetune.train.inputs import manifest
    from tpru_agent.finetune.train.modeling import PROVENANCE

    info = json.loads((final / PROVENANCE).read_text(encoding="utf-8")) if (final / PROVENANCE).is_file() else {}
    card = model_card(cfg.to_dict(), base=cfg.base, base_path=str(base_path), data=manifest(cfg.data),
                      steps=result.steps, evaluation=result.evaluation, weights=info.get("weights", "full"),
                      data_report=result.data)
    (final / "README.md").write_text(card, encoding="utf-8")
    (Path(cfg.output_dir) / "MODEL_CARD.md").write_text(card, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Entry point of each launched process: ``python -m tpru_agent.finetune.train.job --config FILE [--resume]``."""
    parser = argparse.ArgumentParser(prog="python -m tpru_agent.finetune.train.job")
    parser.add_argument("--config", required=True, help="a resolved config.yaml (written by tpru finetune)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if _is_main() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result = train(resolve_config(args.config), resume=args.resume)
    except TPRUError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    if result.status == "interrupted":
        sys.stderr.write(f"interrupted: checkpoint {result.checkpoint}; resume with --resume\n")
        return 143
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
