"""tpru-nano from scratch, through the product path only: ``python -m tpru_agent.finetune.train.recipes.nano``.

Stages (each one resumable; rerun the same command after a kill and it continues where it stopped):

1. ``data``: ``tpru data build`` from Meta-World expert episodes of the 45 ML45 train tasks (train + a test split
   of unseen episodes), and a held-out build of the 5 ML45 test tasks the model never trains on;
2. ``base``: ``tpru testing build-tiny --size nano``: a random ~5.8M-parameter Qwen2.5-VL with a locally trained
   tokenizer and Qwen's special tokens and chat template;
3. ``sft``: ``tpru finetune --method sft`` (answer-only targets, see ``nano.yaml``);
4. ``grpo``: ``tpru finetune --method grpo`` on the SFT weights with the TPRU reward;
5. ``release``: the GRPO weights cast to bf16 (half the package size) and ``tpru export --format onnx`` of those
   same weights at the frame size the model is served at, so the hf and onnx engines run identical numbers;
6. ``eval``: ``tpru eval run`` in fast mode on unseen episodes and unseen tasks, for the released ONNX model and
   the classic engine (what a bare install runs is what is measured);
7. ``ship``: the release copied into ``tpru_agent/models/tpru-nano/`` (hf folder + ``onnx/``), with its model card.

Every setting is in ``nano.yaml`` beside this file. ``--stages`` picks a subset; ``--workdir`` holds everything.

Example:
    $ python -m tpru_agent.finetune.train.recipes.nano --workdir runs/nano
    $ python -m tpru_agent.finetune.train.recipes.nano --workdir runs/nano --stages release,eval
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from tpru_agent.errors import ConfigError, TPRUError
from tpru_agent.fsutil import replace_dir, write_json

log = logging.getLogger(__name__)

RECIPE = Path(__file__).with_name("nano.yaml")
STAGES = ("data", "base", "sft", "grpo", "release", "eval", "ship")
ML45_TEST = ("bin-picking-v3", "box-close-v3", "door-lock-v3", "door-unlock-v3", "hand-insert-v3")


def load_recipe(path: str | os.PathLike = RECIPE) -> dict:
    """The recipe as a dict (``nano.yaml``)."""
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def ml45_train_tasks() -> list[str]:
    """The 45 ML45 train tasks: every Meta-World v3 task the project describes, minus the 5 ML45 test tasks."""
    from tpru_agent.finetune.sources.metaworld import TASK_SENTENCES

    return [t for t in TASK_SENTENCES if t not in ML45_TEST]


def tpru(*args: str) -> None:
    """Run one ``tpru`` command in a child process (the product path, exactly as a user runs it)."""
    cmd = [sys.executable, "-m", "tpru_agent.cli.main", *args]
    print("$ tpru " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def _sim_spec(tasks: list[str], episodes: int, frames: int) -> str:
    return f"metaworld:tasks={'+'.join(tasks)},episodes={episodes},frames={frames}"


def stage_data(work: Path, recipe: dict, workers: int) -> None:
    d, h = recipe["data"], recipe["heldout"]
    tasks = ml45_train_tasks() if d["train_tasks"] == "ml45-train" else list(d["train_tasks"])
    leaked = sorted(set(tasks) & set(h["tasks"]))
    if leaked:
        raise ConfigError(f"held-out tasks {leaked} are also training tasks; remove them from data.train_tasks")
    tpru("data", "build", "-s", _sim_spec(tasks, d["episodes_per_task"], d["frames_per_episode"]),
         "-o", str(work / "data"), "--seed", str(d["seed"]), "--samples-per-episode", str(d["samples_per_episode"]),
         "--test-fraction", str(d["test_fraction"]), "-w", str(workers))
    tpru("data", "build", "-s", _sim_spec(list(h["tasks"]), h["episodes_per_task"], h["frames_per_episode"]),
         "-o", str(work / "heldout"), "--seed", str(h["seed"]), "--samples-per-episode", str(h["samples_per_episode"]),
         "--test-fraction", "1.0", "-w", str(workers))


def stage_base(work: Path, recipe: dict) -> None:
    tpru("testing", "build-tiny", str(work / "base"), "--size", recipe["base"]["size"], "--seed",
         str(recipe["base"]["seed"]))


def _finetune(work: Path, recipe: dict, stage: str, base: Path) -> None:
    import yaml

    out = work / stage
    if (out / "final" / "model.safetensors").is_file():
        print(f"{stage}: {out / 'final'} exists; skipped", flush=True)
        return
    cfg = dict(recipe[stage], min_pixels=recipe["min_pixels"], max_pixels=recipe["max_pixels"])
    cfg_path = work / f"{stage}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    args = ["finetune", "--config", str(cfg_path), "--base", str(base), "--data", str(work / "data"), "-o", str(out)]
    tpru(*args, *(["--resume"] if out.exists() else []))


def stage_eval(work: Path, recipe: dict, model: Path) -> None:
    budget = ["--min-pixels", str(recipe["min_pixels"]), "--max-pixels", str(recipe["max_pixels"])]
    for name, data in (("unseen-episodes", work / "data"), ("unseen-tasks", work / "heldout")):
        tpru("eval", "run", "-m", str(model), "-d", str(data), "--split", "test", "--mode", "fast",
             "-o", str(work / "eval" / f"nano-{name}"), *budget)
        tpru("eval", "run", "--engine", "classic", "-d", str(data), "--split", "test",
             "-o", str(work / "eval" / f"classic-{name}"))


def stage_release(work: Path, recipe: dict) -> None:
    import shutil

    from tpru_agent.finetune.train.modeling import cast_checkpoint
    from tpru_agent.sizing import PixelBudget, budget_size

    release, onnx = work / "release", work / "release" / "onnx"
    if not (release / "model.safetensors").is_file():
        tmp = work / ".release.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(work / "grpo" / "final", tmp)
        cast_checkpoint(tmp, "bfloat16")
        replace_dir(tmp, release)
    if not any(onnx.glob("*.onnx")):
        side = budget_size(224, 224, PixelBudget(min_pixels=recipe["min_pixels"], max_pixels=recipe["max_pixels"]))
        tpru("export", "-m", str(release), "--format", "onnx", "--out", str(onnx), "--frame-size",
             f"{side[0]}x{side[1]}", "--overwrite")


def run(work: Path, stages: list[str], workers: int = 1, recipe_path: str | os.PathLike = RECIPE) -> dict:
    """Run ``stages`` of the recipe in ``work``; returns wall seconds per stage (also in ``work/timings.json``)."""
    recipe = load_recipe(recipe_path)
    work.mkdir(parents=True, exist_ok=True)
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for stage in stages:
        started = time.perf_counter()
        if stage == "data":
            stage_data(work, recipe, workers)
        elif stage == "base":
            stage_base(work, recipe)
        elif stage == "sft":
            _finetune(work, recipe, "sft", work / "base")
        elif stage == "grpo":
            _finetune(work, recipe, "grpo", work / "sft" / "final")
        elif stage == "release":
            stage_release(work, recipe)
        elif stage == "eval":
            stage_eval(work, recipe, work / "release" / "onnx")
        elif stage == "ship":
            from tpru_agent.finetune.train.recipes.nano_ship import ship

            ship(work, recipe)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started
        write_json(timings_path, timings)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpru_agent.finetune.train.recipes.nano", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/nano", help="where data, runs, reports and the export go")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--workers", type=int, default=1, help="data build worker processes")
    parser.add_argument("--recipe", default=str(RECIPE), help="recipe YAML (default: nano.yaml beside this file)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    try:
        timings = run(Path(args.workdir), stages, args.workers, args.recipe)
    except TPRUError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"error: stage command failed with exit {exc.returncode}: {' '.join(map(str, exc.cmd[3:]))}",
              file=sys.stderr)
        return 1
    print(json.dumps(timings, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
