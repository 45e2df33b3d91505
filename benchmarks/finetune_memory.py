"""Peak memory and time of one GRPO step of ``tpru finetune`` (tiny model, CPU), by rollout size.

Each point trains one optimizer step (``max_steps 1``) in its own subprocess, through the product path
(``tpru_agent.finetune.train.job``), on a TPRU-layout dataset of 4- and 3-frame ordering and 7-image next-frame
questions at the TPRU pixel budget, and reports the subprocess's peak RSS (``ru_maxrss``) and wall time. The child
runs under an address-space cap (``--cap-gib``, default 12): a point that would grow past it fails fast instead of
taking the machine down, and is reported as ``over_cap``.

The figures show how the peak grows with the rollout (``prompts_per_rollout x num_generations`` completions,
all generated before the first update) and with the completion length, and what chunking the generate calls
(``generation_chunk_size``, default the micro-batch) changes. The cap limits *address space*, which torch
reserves well above the resident peak: 6 GiB was too tight for a 1.9 GiB resident run, so the default is 12.

Issue 13 (``loader`` points): the reported shape (updates of half a rollout, 2 generations, micro-batch 4, so
``gradient_accumulation_steps = prompts_per_rollout / 4`` and ``steps_per_generation`` twice that) with TRL's stock
train loader, which decodes the whole rollout once per micro-step fetch, against ours, which decodes each row of the
rollout once (``finetune/train/grpo.py``); ``decoded_rows`` counts the rows decoded during the one step.

    OMP_NUM_THREADS=1 python benchmarks/finetune_memory.py --workdir /tmp/tpru-memory
    OMP_NUM_THREADS=1 python benchmarks/finetune_memory.py --loader-only --rows 128 --loader-rollouts 64 128
    OMP_NUM_THREADS=1 python -m benchmarks finetune_memory --size tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]

#: (label, prompts per rollout, rollouts per prompt, completion tokens, generation batch or None for the default)
POINTS = (
    ("rollout 8 x 2, 64 tok", 8, 2, 64, None),
    ("rollout 32 x 2, 64 tok", 32, 2, 64, None),
    ("rollout 32 x 2, 64 tok, one generate call", 32, 2, 64, 64),
    ("rollout 16 x 2, 256 tok", 16, 2, 256, None),
)


def write_data(root: Path, rows: int) -> Path:
    """A TPRU-layout dataset of ``rows`` train rows (the test suite's growing-bar questions)."""
    if (root / "manifest.json").is_file():
        return root
    sys.path.insert(0, str(REPO / "tests"))
    from test_finetune import write_dataset  # the same synthetic questions the tests train on

    return write_dataset(root, n_train=rows, n_test=2)


def child(spec: dict) -> None:
    """Runs inside the subprocess: one GRPO step; prints one JSON line with the figures.

    ``spec["loader"]`` (popped): ``"stock"`` trains with TRL's own train loader (the behaviour before issue 13's
    fix), ``"ours"`` with ours; either way the rows decoded are counted.
    """
    import torch

    torch.set_num_threads(1)
    from tpru_agent.finetune.train.config import resolve_config
    from tpru_agent.finetune.train.job import train

    loader = spec.pop("loader", None)
    decoded = [0]
    if loader is not None:
        import datasets
        from trl import GRPOTrainer

        from tpru_agent.finetune.train.grpo import TPRUGRPOTrainer

        if loader == "stock":
            TPRUGRPOTrainer.get_train_dataloader = GRPOTrainer.get_train_dataloader
        original = datasets.Dataset.__getitems__

        def counting(self, keys):
            decoded[0] += len(keys)
            return original(self, keys)

        datasets.Dataset.__getitems__ = counting
    started = time.perf_counter()
    result = train(resolve_config(overrides=spec))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"steps": result.steps.get("grpo", 0), "peak_rss_mib": round(peak_kib / 1024, 1),
           "wall_s": round(time.perf_counter() - started, 1)}
    if loader is not None:
        out["decoded_rows"] = decoded[0]
    print(json.dumps(out))


def measure(workdir: Path, model: Path, data: Path, point: tuple, cap_gib: float, **extra) -> dict:
    label, prompts, generations, tokens, gen_batch = point
    spec = dict(base=str(model), data=str(data), output_dir=str(workdir / f"run-{time.time_ns()}"), method="grpo",
                device="cpu", progress=False, max_steps=1, num_generations=generations,
                per_device_train_batch_size=generations * 2, prompts_per_rollout=prompts,
                prompts_per_update=prompts, max_completion_length=tokens, beta=0.0, eval_samples=0, save_steps=1000,
                rewards=["tpru", "label_density"], data_cache_dir=str(workdir / "datasets-cache"))
    if gen_batch is not None:
        spec["generation_chunk_size"] = gen_batch
    spec.update(extra)
    cap = int(cap_gib * 1024 ** 3)
    code = f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.finetune_memory import child; " \
           f"child(json.loads({json.dumps(json.dumps(spec))}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)),
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        over = "MemoryError" in proc.stderr or "Cannot allocate" in proc.stderr or proc.returncode < 0
        return {"label": label, "over_cap": over, "error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    return {"label": label, **json.loads(lines[-1])}


def measure_loader(workdir: Path, model: Path, data: Path, prompts: int, loader: str, cap_gib: float) -> dict:
    """Issue 13's shape at ``prompts`` prompts per rollout: updates of half of it, 2 generations, micro-batch 4."""
    point = (f"loader {loader}: rollout {prompts} x 2, updates of {prompts // 2}, micro-batch 4", prompts, 2, 16,
             None)
    return measure(workdir, model, data, point, cap_gib, loader=loader, prompts_per_update=prompts // 2,
                   per_device_train_batch_size=4)


def measure_all(workdir: Path, *, size: str = "tiny", rows: int = 40, cap_gib: float = 12.0,
                points: tuple = POINTS, loader_rollouts: tuple = (32,), data: Path | None = None) -> dict:
    from tpru_agent.testing import build_tiny_checkpoint

    workdir.mkdir(parents=True, exist_ok=True)
    model = build_tiny_checkpoint(workdir / f"model-{size}", size=size, seed=0)
    data = data or write_data(workdir / f"data-{rows}", rows)
    out: dict = {"train_rows": rows, "cap_gib": cap_gib}
    for point in points:
        figures = measure(workdir, model, data, point, cap_gib)
        key = figures.pop("label")
        out[key] = figures
    for prompts in loader_rollouts:
        for loader in ("stock", "ours"):
            figures = measure_loader(workdir, model, data, prompts, loader, cap_gib)
            out[figures.pop("label")] = figures
    return out


def run(args) -> dict:
    """Suite entry point (``python -m benchmarks finetune_memory``): tiny model, a few minutes."""
    size = args.size if getattr(args, "size_given", False) else "tiny"
    if size not in ("tiny", "mid"):
        return {"skipped": f"finetune_memory runs on the offline tiny / mid models, not {size!r}"}
    root = Path(args.workdir) if getattr(args, "workdir", None) else Path(tempfile.gettempdir()) / "tpru-memory"
    points = POINTS[:1] if getattr(args, "quick", False) else POINTS
    return measure_all(root, size=size, points=points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "tpru-memory"))
    parser.add_argument("--size", default="tiny", choices=["tiny", "mid"])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--cap-gib", type=float, default=12.0)
    parser.add_argument("--loader-rollouts", type=int, nargs="*", default=[32],
                        help="prompts per rollout of the issue-13 loader points (each <= --rows)")
    parser.add_argument("--loader-only", action="store_true", help="only the issue-13 loader points")
    parser.add_argument("--data", help="a TPRU-layout dataset instead of the synthetic one")
    a = parser.parse_args()
    print(json.dumps(measure_all(Path(a.workdir), size=a.size, rows=a.rows, cap_gib=a.cap_gib,
                                 points=() if a.loader_only else POINTS, loader_rollouts=tuple(a.loader_rollouts),
                                 data=Path(a.data) if a.data else None), indent=2))


if __name__ == "__main__":
    main()
