"""The ``ship`` stage of the tpru-nano recipe: the release into ``tpru_agent/models/tpru-nano/`` with its card.

The model card is written from the run's own files only (eval reports, timings, the SFT / GRPO metrics), so every
figure in it was measured by the recipe that made the weights. Whether tpru-nano becomes the CLI's fallback is
decided here, by measurement: only when it beats the classic engine on ordering of unseen tasks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tpru_agent.errors import ConfigError
from tpru_agent.fsutil import replace_dir

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "tpru_agent" / "models" / "tpru-nano"
#: Files of the release that are not shipped (training provenance stays in the run folder).
SKIP = {"tpru_finetune.json"}


def _report(path: Path) -> dict | None:
    file = path / "report.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


def _cell(report: dict | None, task: str) -> str:
    if report is None:
        return "not measured"
    row = report.get("per_task", {}).get(task)
    if not row:
        return "n/a"
    lo, hi = row.get("ci95", [None, None])
    return f"{100 * row['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={row['n']})"


def figures(work: Path) -> dict:
    """Accuracy per task and split for nano and classic, from the recipe's eval reports."""
    out = {}
    for split in ("unseen-episodes", "unseen-tasks"):
        for who in ("nano", "classic"):
            rep = _report(work / "eval" / f"{who}-{split}")
            out[f"{who}/{split}"] = {t: (rep or {}).get("per_task", {}).get(t) for t in ("ordering", "next",
                                                                                        "previous", "ordering_mcq")}
    return out


def beats_classic(work: Path) -> bool:
    """tpru-nano is the fallback only if its ordering accuracy on unseen tasks is at least twice classic's and
    its 95% interval lies above classic's point estimate (issue 10's bar)."""
    nano, classic = _report(work / "eval" / "nano-unseen-tasks"), _report(work / "eval" / "classic-unseen-tasks")
    if not nano or not classic:
        return False
    n, c = nano["per_task"].get("ordering"), classic["per_task"].get("ordering")
    if not n or not c:
        return False
    return n["value"] >= max(0.2, 2 * c["value"]) and n["ci95"][0] > c["value"]


def card(work: Path, recipe: dict, default: bool) -> str:
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").is_file() else {}
    nano_u, classic_u = _report(work / "eval" / "nano-unseen-tasks"), _report(work / "eval" / "classic-unseen-tasks")
    nano_e, classic_e = (_report(work / "eval" / "nano-unseen-episodes"),
                         _report(work / "eval" / "classic-unseen-episodes"))
    rows = "\n".join(
        f"| {task} | {_cell(nano_e, task)} | {_cell(classic_e, task)} | {_cell(nano_u, task)} | {_cell(classic_u, task)} |"
        for task in ("ordering", "ordering_mcq", "next", "previous"))
    hours = sum(timings.values()) / 3600 if timings else float("nan")
    d = recipe["data"]
    return f"""# tpru-nano

A {recipe['base']['size']} Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, ~5.8M parameters: text 256 wide x 4
layers, vision 128 wide x 4 layers, a 2,000-token BPE vocabulary trained locally with Qwen's special tokens and chat
template) trained from random weights by this project's own pipeline on 2 CPU cores. It is the proof that
`tpru data build` + `tpru finetune` + `tpru eval` produce weights that do the job, and it makes a fresh install
answer offline. It is **not** TPRU-3B: for real work use `hf download Stephengzk/TPRU-3B` (~7.5 GB).

- Load: `TPRU("tpru-nano")` (ONNX Runtime, `onnx/`, no torch) or `TPRU("tpru-nano", engine="hf")` (this folder).
- Served at its own pixel budget (`tpru_budget.json`: {recipe['min_pixels']}..{recipe['max_pixels']} px, a 224x224
  frame becomes 112x112, 16 visual tokens), the budget it was trained at. The ONNX vision graph has a fixed
  112x112 frame: non-square frames are squeezed to it.
- Answers in fast mode as trained: the SFT target is the answer block alone (`<answer>CABD</answer>`), so
  `mode="fast"` scores exactly what the model learned to write. Reason mode is not meaningful for this model.
- CLI fallback when TPRU-3B is missing: **{'yes' if default else 'no'}** (chosen by measurement: it must order
  unseen tasks at least twice as well as the classic engine).

## Data
`tpru data build` over Meta-World expert episodes of the 45 ML45 **train** tasks ({d['episodes_per_task']} episodes
each, {d['frames_per_episode']} frames, {d['samples_per_episode']} questions per episode, seed {d['seed']}): all
three TPRU tasks with negatives, in the TPRU-25k layout. Never trained on: the 5 ML45 test tasks
(bin-picking, box-close, door-lock, door-unlock, hand-insert), MiniWoB++ and panda-gym.

## Recipe
`python -m tpru_agent.finetune.train.recipes.nano` (settings: `finetune/train/recipes/nano.yaml`): supervised warm-up
(answer-only targets, lr {recipe['sft']['sft_learning_rate']}, batch {recipe['sft']['sft_batch_size']},
{recipe['sft']['sft_max_steps']} steps), then GRPO with the TPRU reward ({recipe['grpo']['max_steps']} steps,
{recipe['grpo']['num_generations']} rollouts per prompt), weights cast to bf16, ONNX export of those weights.
Wall time of the recorded run: {hours:.2f} h on 2 shared CPU cores.

## Figures (fast mode, accuracy % [95% interval], from the recipe's `tpru eval run` reports)
| task | nano, unseen episodes | classic, unseen episodes | nano, unseen tasks | classic, unseen tasks |
|---|---|---|---|---|
{rows}

Ordering is exact match of the 4-frame permutation (chance 1/24 = 4.2%). More figures (verify_step separation,
speed, VOC) are in `benchmarks/RESULTS.md`.

## Limitations
- One domain: tabletop robot arms in Meta-World's renderer. GUI screenshots and other scenes are out of
  distribution; expect chance-level answers there.
- It does not read the description closely: a 2,000-token vocabulary and no language pre-training.
- Tiny capacity; trained for about an hour of CPU time. Treat its confidence as a ranking signal, not a
  calibrated probability.
"""


def ship(work: Path, recipe: dict, target: Path = PACKAGE_DIR) -> Path:
    """Copy the release (hf folder + ``onnx/``) into the package, write the card and the fallback flag."""
    release = work / "release"
    if not (release / "model.safetensors").is_file() or not any((release / "onnx").glob("*.onnx")):
        raise ConfigError(f"{release} holds no release (model.safetensors + onnx/); run the release stage first: "
                          "python -m tpru_agent.finetune.train.recipes.nano --stages release,eval,ship")
    default = beats_classic(work)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(release, tmp, ignore=lambda d, names: [n for n in names if n in SKIP])
    (tmp / "README.md").write_text(card(work, recipe, default), encoding="utf-8")
    meta = {"name": "tpru-nano", "default_fallback": default, "figures": figures(work)}
    (tmp / "tpru_nano.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    replace_dir(tmp, target)
    print(f"shipped {target} (fallback: {default})", flush=True)
    return target
