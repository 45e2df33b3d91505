"""The run folder and the trainer callbacks that fill it: metrics JSONL, curves PNG, rich progress, SIGTERM.

Layout of ``OUTPUT_DIR``::

    config.yaml          the resolved config (a valid --config file)
    metrics.jsonl        one record per log step: stage, step, reward, accuracy, kl, loss, held-out accuracy...
    rollouts.jsonl       per GRPO rollout: step, dataset rows used, image tokens per prompt (the batch check)
    curves.png           reward / accuracy / KL / loss against the step
    grpo/checkpoint-N/   trainer checkpoints (sft/ for the warm-up), every save_steps steps and on SIGTERM
    final/               the weights TPRU(path) loads, with README.md (model card)
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tpru_agent.fsutil import atomic_path, write_text

log = logging.getLogger(__name__)

CURVES = (("reward", ("reward",)), ("accuracy", ("accuracy", "eval_accuracy")), ("KL", ("kl",)),
          ("loss", ("loss",)))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a crash keeps every line written so far)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=float) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file (a torn last line from a crash is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_jsonl(path: Path, stage: str, step: int) -> None:
    """Drop the records of ``stage`` after ``step`` (a resumed run rewrites them), atomically."""
    records = [r for r in read_jsonl(path) if not (r.get("stage") == stage and r.get("step", 0) > step)]
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def last_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the highest step under ``folder`` that finished saving, or ``None``."""
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def checkpoint_step(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[1]) if checkpoint else 0


class MetricsCallback(TrainerCallback):
    """Writes every log record to ``metrics.jsonl`` (main process) and keeps the last values for the live line."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = path, stage
        self.last: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"stage": self.stage, "step": state.global_step}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        self.last.update(record)
        append_jsonl(self.path, record)


class ProgressCallback(TrainerCallback):
    """A rich progress bar per stage with a live line: reward, accuracy, KL, loss of the last log step."""

    def __init__(self, metrics: MetricsCallback, stage: str, console=None):
        self.metrics, self.stage, self.console = metrics, stage, console
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[line]}"),
                                 console=self.console or Console(stderr=True), transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.stage, total=state.max_steps, completed=state.global_step, line="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        m = self.metrics.last
        parts = [f"{name} {m[key]:.3g}" for name, key in (("reward", "reward"), ("acc", "accuracy"),
                                                           ("kl", "kl"), ("loss", "loss")) if key in m]
        if "eval_accuracy" in m:
            parts.append(f"held-out {m['eval_accuracy']:.3f}")
        self.progress.update(self.task, line="  ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None


class SigtermCallback(TrainerCallback):
    """On SIGTERM, finish the current step, save a checkpoint and stop (every process agrees on the step)."""

    def __init__(self):
        self.requested = False
        self.stopped = False
        self._previous = None

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True

    def _agreed(self) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0],
                            device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class HeldoutCallback(TrainerCallback):
    """Every ``every`` steps, greedy held-out accuracy of the live model, logged as ``eval_accuracy``."""

    def __init__(self, every: int, evaluate, metrics: MetricsCallback):
        self.every, self.evaluate, self.metrics = every, evaluate, metrics

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every <= 0 or state.global_step % self.every or model is None:
            return
        result = self.evaluate(model)
        record = {"stage": self.metrics.stage, "step": state.global_step, "eval_accuracy": result["accuracy"],
                  "eval_format": result["format"]}
        self.metrics.last.update(record)
        if state.is_world_process_zero:
            append_jsonl(self.metrics.path, record)


class PlotCallback(TrainerCallback):
    """Redraws ``curves.png`` at every checkpoint and at the end of a stage."""

    def __init__(self, metrics_path: Path, png: Path):
        self.metrics_path, self.png = metrics_path, png

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_curves(self.metrics_path, self.png)

    def on_train_end(self, args, state, control, **kwargs):
        self.on_save(args, state, control)


def plot_curves(metrics_path: Path, png: Path) -> Path | None:
    """Reward, accuracy (train and held-out), KL and loss against the step, one panel each; atomic write."""
    records = read_jsonl(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    offset, offsets = 0, {}
    for r in records:  # stages follow each other on one step axis
        offsets.setdefault(r.get("stage", ""), None)
    for stage in offsets:
        offsets[stage] = offset
        offset += max((r.get("step", 0) for r in records if r.get("stage", "") == stage), default=0)
    for ax, (title, keys) in zip(axes.flat, CURVES):
        for key in keys:
            for stage, base in offsets.items():
                pts = sorted({r["step"]: r[key] for r in records if r.get("stage", "") == stage and key in r}.items())
                if pts:
                    ax.plot([base + s for s, _ in pts], [v for _, v in pts], marker=".",
                            label=f"{stage} {key}".strip())
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(png, ".tmp.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return png


#: What the model card's recipe line names first; the config's own keys or TRL fields it passed through.
RECIPE_KEYS = ("num_generations", "temperature", "top_p", "beta", "learning_rate", "lr_scheduler_type", "weight_decay",
               "max_grad_norm", "num_train_epochs", "max_completion_length", "prompts_per_rollout",
               "prompts_per_update", "rewards", "min_pixels", "max_pixels", "max_prompt_length", "freeze_vision", "seed")


def recipe_items(cfg_dict: dict[str, Any]) -> list[str]:
    """``key=value`` for :data:`RECIPE_KEYS`, read from the config or its pass-through (``trl``), then ``trl=`` with
    the other pass-through values (clipping, loss...): every value the trainers got from the config.

    Example:
        >>> recipe_items({"beta": 0.01, "trl": {"temperature": 1.0, "delta": 3.0}})
        ['temperature=1.0', 'beta=0.01', "trl={'delta': 3.0}"]
    """
    passed = dict(cfg_dict.get("trl") or {})
    items = [f"{k}={cfg_dict[k] if k in cfg_dict else passed.pop(k)}" for k in RECIPE_KEYS
             if k in cfg_dict or k in passed]
    return items + ([f"trl={passed}"] if passed else [])


def model_card(cfg_dict: dict[str, Any], *, base: str, base_path: str, data: dict[str, Any], steps: dict[str, int],
               evaluation: dict[str, Any] | None, weights: str, data_report: dict | None = None) -> str:
    """The README.md written next to the final weights (``data_report``: per stage, prompts left out and rollout
    fitting, from the run)."""
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [tpru, qwen2.5-vl, grpo]",
        "---", "", f"# TPRU fine-tune of {base}", "",
        f"Trained with `tpru finetune` (method `{cfg_dict['method']}`, peft `{cfg_dict['peft']}`) on TPRU-layout "
        "data: temporal reordering, next-frame prediction and previous-frame review over multi-image prompts.", "",
        "## Load", "", "```python", "from tpru_agent import TPRU", "model = TPRU(\"path/to/this/folder\")",
        "model.order_frames([\"a.png\", \"b.png\", \"c.png\", \"d.png\"])", "```", "",
    ]
    if weights == "adapter":
        lines += ["This folder holds a LoRA adapter, not full weights: the SDK loads it on top of the base named in "
                  "`adapter_config.json` (needs `peft`).", ""]
    lines += ["## Training", "", f"- base: `{base}` (`{base_path}`)",
              "- steps: " + ", ".join(f"{k} {v}" for k, v in steps.items()),
              f"- data: `{data.get('path')}`" + (f", splits {data['splits']}" if data.get("splits") else "")]
    if data.get("manifest"):
        lines.append(f"- data manifest: `{json.dumps(data['manifest'], default=str)[:800]}`")
    lines.append("- recipe: " + ", ".join(recipe_items(cfg_dict)))
    for stage, report in (data_report or {}).items():
        overlong = report.get("overlong") or {}
        if overlong.get("dropped"):
            lines.append(f"- {stage}: left out {overlong['dropped']} of {overlong['rows']} prompts over "
                         f"{overlong['max_prompt_length']} tokens (longest {overlong['longest']})")
        if report.get("fitted"):
            lines.append(f"- {stage}: {report['fitted']}")
    from tpru_agent.finetune.train.authors_diff import differences_markdown

    lines += ["", *differences_markdown(), "## Evaluation", ""]
    if evaluation:
        lo, hi = evaluation["accuracy_ci"]
        lines.append(f"Held-out accuracy (greedy, {evaluation['n']} items of split `{cfg_dict['eval_split']}`): "
                     f"**{evaluation['accuracy']:.3f}** (95% CI {lo:.3f}-{hi:.3f}); well-formed answers "
                     f"{evaluation['format']:.3f}.")
        if evaluation.get("by_task"):
            lines.append("By task: " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation["by_task"].items()) + ".")
    else:
        lines.append("Not evaluated in the run; use `tpru eval` on these weights.")
    lines += ["", "Images are resized to the training pixel budget "
              f"({cfg_dict.get('min_pixels')}..{cfg_dict.get('max_pixels')} pixels); serve at the same budget.", ""]
    return "\n".join(lines)
