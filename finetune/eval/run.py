"""``tpru eval``: accuracy of any engine on any TPRU-layout dataset, with intervals, calibration and plots.

One call evaluates a model on a dataset and writes, under ``OUT``:

- ``items.jsonl``: one line per item (id, task, prediction, confidence, raw text, correct, latency...), appended
  and fsync'ed as each answer comes, so an interrupted run loses at most the item in flight; a rerun with the
  same ``OUT`` skips the items already there (by id).
- ``report.json``: accuracy with its 95% Wilson interval under ``accuracy``, then per task, per domain, on negative
  samples; parse failures; calibration (ECE, reliability bins); answer-letter distribution against the ground
  truth (position bias); latency p50 / p95 (see :mod:`tpru_agent.finetune.eval.report`).
- ``accuracy.png`` and ``reliability.png``.

Every row is answered through ``TPRU.ask`` (the facade's primitive), so the hf, onnx, openai and classic engines
all run the same way. A parse failure (``ParseError``) counts as a wrong answer and as a failure.

Example:
    >>> from tpru_agent.finetune.eval.run import EvalConfig, run_eval
    >>> config = EvalConfig(model="tpru-3b", data="TPRU-test", mode="fast", out="runs/tpru3b")
    >>> report = run_eval(config)                                          # doctest: +SKIP
    >>> report["accuracy"]["value"], report["accuracy"]["ci95"]            # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from tpru_agent.asking import passes
from tpru_agent.errors import ConfigError, FrameError, ParseError
from tpru_agent.finetune.eval import report as eval_report
from tpru_agent.finetune.eval.dataset import EvalDataset, EvalRow, open_dataset
from tpru_agent.fsutil import write_json

log = logging.getLogger(__name__)

ITEMS_FILE = "items.jsonl"
REPORT_FILE = "report.json"
RUN_FILE = "run.json"
#: Settings that must match for a rerun to resume into the same output folder.
RESUME_KEYS = ("model", "engine", "mode", "debias", "template", "data", "split", "max_new_tokens", "quantization")
#: Permutation probabilities kept per ordering item (24 for 4 frames; the top ones are what matters).
KEEP_PROBABILITIES = 6


@dataclass
class EvalConfig:
    """What to evaluate, how, and where the results go.

    Attributes:
        model: name, Hub id, local folder or ``"classic"`` (a label only when ``run_eval`` gets ``model=``).
        data: a TPRU-layout dataset (parquet file / folder, or a ``save_to_disk`` folder).
        out: output folder; ``None`` -> ``runs/eval/<model>-<mode>``.
        engine: ``auto`` / ``hf`` / ``onnx`` / ``openai`` / ``classic``.
        mode: ``reason`` (chain of thought, as TPRU was trained) or ``fast`` (score the answers in one pass).
        split: ``auto`` (the test split when there is one), ``all``, or a split name.
        limit: evaluate only the first ``limit`` rows (dataset order).
        debias: fast mode: average next / previous answers over this many cyclic shifts of the candidates.
        bins: reliability-diagram bins.
        plots: write the PNG plots (needs matplotlib).
        min_pixels / max_pixels: the pixel budget frames are resized to (default: the model's own, else TPRU's
            16,384..36,864); evaluate a model at the budget it was trained at.
    """

    model: str = "tpru-3b"
    data: str = ""
    out: str | None = None
    engine: str = "auto"
    mode: str = "reason"
    split: str = "auto"
    limit: int | None = None
    debias: int = 1
    quantization: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    template: str | None = None
    base_url: str | None = None
    max_new_tokens: int = 1024
    bins: int = 10
    plots: bool = True
    min_pixels: int | None = None
    max_pixels: int | None = None

    def check(self) -> None:
        """Raise :class:`ConfigError` for values that cannot work."""
        if not self.data:
            raise ConfigError("no dataset given: pass data= (a TPRU parquet folder or a save_to_disk folder)")
        if self.mode not in ("reason", "fast"):
            raise ConfigError(f"mode must be 'reason' or 'fast', got {self.mode!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.debias < 1:
            raise ConfigError(f"debias must be >= 1, got {self.debias}")
        if self.debias > 1 and self.mode != "fast":
            raise ConfigError(f"debias={self.debias} averages scored answers, which only fast mode has; pass "
                              "mode='fast' (--mode fast) or drop debias")
        if self.bins < 1:
            raise ConfigError(f"bins must be >= 1, got {self.bins}")

    def out_dir(self) -> Path:
        """The output folder (default ``runs/eval/<model>-<mode>``)."""
        if self.out:
            return Path(self.out)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(self.model)).name or str(self.model)).strip("-")
        return Path("runs") / "eval" / f"{slug or 'model'}-{self.mode}"


# ----------------------------------------------------------------------------------------------- item log
class ItemLog:
    """The per-item JSONL: read back on start (a torn last line is cut off), then appended with fsync."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]  # an interrupted write leaves a line without its newline
        if len(keep) != len(data):
            log.warning("%s ends with a partial line (interrupted run); dropping it", self.path)
            with open(self.path, "r+b") as fh:
                fh.truncate(len(keep))
        for n, line in enumerate(keep.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON; ignoring it (the item will be evaluated again)", self.path, n)
                continue
            self.records[str(record["id"])] = record

    def append(self, record: dict) -> None:
        """Write one record durably (flush + fsync) before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records[str(record["id"])] = record


def check_resume(folder: Path, settings: dict, overwrite: bool, *, keys: tuple[str, ...], journal: str = ITEMS_FILE,
                 outputs: tuple[str, ...] = (REPORT_FILE,), what: str = "a run") -> None:
    """Start afresh (``overwrite``), or refuse to resume a run in ``folder`` made with other ``keys`` settings.

    One rule for every resumable job (``tpru eval run``, ``tpru eval voc``, ``tpru label``): the settings live in
    ``run.json``; a finished item journal plus a settings change is an error naming each change, never a silent mix.

    Raises:
        ConfigError: ``folder`` holds a run whose settings differ in any of ``keys``.
    """
    run_file, items = folder / RUN_FILE, folder / journal
    if overwrite:
        for path in (run_file, items, *(folder / name for name in outputs)):
            path.unlink(missing_ok=True)
    elif run_file.exists() and items.exists():
        before = json.loads(run_file.read_text(encoding="utf-8"))
        changed = {k: (before.get(k), settings.get(k)) for k in keys if before.get(k) != settings.get(k)}
        if changed:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(f"{str(folder)!r} holds {what} with other settings ({shown}); pass another --out, or "
                              "--overwrite to start that folder afresh")
    write_json(run_file, settings, default=str)


# ----------------------------------------------------------------------------------------------- answering
def prepare_row(tpru, row: EvalRow, stored=None):
    """The row's question and its images at the model's pixel budget (used as stored, not sized again, when the
    dataset's frames were stored at that budget: ``stored``, see ``EvalDataset.frames_budget``).

    Raises:
        ConfigError: the text, images and answer do not make a valid question.
        FrameError: an image cannot be decoded.
    """
    from tpru_agent.finetune.data.tpru_format import looks_served
    from tpru_agent.frames import load_frame
    from tpru_agent.sizing import mark_served, resize_to_budget

    question = row.question()
    as_stored = stored is not None and stored == tpru.budget
    images = [load_frame(image, budget=None if as_stored else tpru.budget, index=i, what=f"row {row.id} images")
              for i, image in enumerate(row.images())]
    if as_stored:  # used as stored when each looks like a served frame; any other is sized as usual
        images = [mark_served(im, tpru.budget) if looks_served(im.size, tpru.budget) else
                  resize_to_budget(im, tpru.budget) for im in images]
    return question, images


def answer_item(tpru, question, images: list, *, mode: str, debias: int = 1):
    """``tpru.ask``, debiased over ``debias`` cyclic shifts of the candidates in fast mode (see ``TPRU.ask``)."""
    return tpru.ask(question, images, mode=mode, debias=debias)


def evaluate_row(tpru, row: EvalRow, question, images: list, *, mode: str, debias: int = 1) -> dict:
    """Answer one prepared row (see :func:`prepare_row`) and return its JSONL record."""
    record = {"id": row.id, "task": question.task, "domain": row.domain, "negative": question.negative,
              "answer": question.answer, "none_letter": question.none_letter, "prediction": None,
              "correct": False, "confidence": None, "probabilities": None, "status": "ok", "error": None}
    started = time.perf_counter()
    try:
        ans = answer_item(tpru, question, images, mode=mode, debias=debias)
    except ParseError as exc:
        record.update(status="parse_error", error=str(exc).split("; raw output:")[0], raw=exc.raw)
    else:
        top = sorted(ans.probabilities.items(), key=lambda kv: -kv[1])
        record.update(prediction=ans.answer, correct=ans.answer == question.answer, confidence=ans.confidence,
                      probabilities=dict(top[:KEEP_PROBABILITIES]), raw=ans.raw, timings=ans.timings)
    record["latency_s"] = time.perf_counter() - started
    counted = (record.get("timings") or {}).get("calls")  # the SDK's own count of model passes, when it gives one
    record["calls"] = int(counted) if counted else passes(question, tpru.effective_mode(mode), debias)
    return record


# ----------------------------------------------------------------------------------------------- the run
Progress = Callable[[int, int, "dict | None"], None]


def open_model(config: EvalConfig):
    """Build the :class:`~tpru_agent.TPRU` the config names."""
    from tpru_agent import TPRU

    kwargs = {"base_url": config.base_url} if config.base_url else {}
    if config.min_pixels is not None or config.max_pixels is not None:
        from tpru_agent.sizing import PixelBudget

        default = PixelBudget()
        high = config.max_pixels or default.max_pixels
        kwargs["budget"] = PixelBudget(min_pixels=config.min_pixels or min(default.min_pixels, high),
                                       max_pixels=high)
    return TPRU(config.model, engine=config.engine, quantization=config.quantization, device=config.device,
                dtype=config.dtype, template=config.template, max_new_tokens=config.max_new_tokens, **kwargs)


def with_effective_mode(config, tpru):
    """``config`` with its ``mode`` set to the one that runs (``TPRU.effective_mode``; a copy, logged, when that
    changes it: the classic engine has no chain of thought, so ``"reason"`` runs, and is recorded, as ``"fast"``)."""
    mode = tpru.effective_mode(config.mode)
    if mode == config.mode:
        return config
    log.warning("the %s engine has no reasoning mode; mode %r runs (and is recorded) as %r", tpru.engine_name,
                config.mode, mode)
    return replace(config, mode=mode)


def run_eval(config: EvalConfig, *, model=None, progress: Progress | None = None, overwrite: bool = False) -> dict:
    """Evaluate, resuming from ``OUT/items.jsonl`` when it exists; returns the report (also in ``OUT``).

    Args:
        config: what to evaluate.
        model: an already-built :class:`~tpru_agent.TPRU` (else one is built from ``config``).
        progress: called as ``progress(done, total, record)``; first with ``record=None`` after resuming.
        overwrite: discard an earlier run in ``OUT`` instead of resuming it.

    Raises:
        ConfigError: bad settings, or ``OUT`` holds a run with other settings.
    """
    config.check()
    dataset = open_dataset(config.data, split=config.split)
    tpru = model if model is not None else open_model(config)
    config = with_effective_mode(config, tpru)
    out = config.out_dir()
    settings = {**asdict(config), "model": str(config.model), "engine": tpru.engine_name,
                "data": dataset.describe()["path"], "split": dataset.split}
    check_resume(out, settings, overwrite, keys=RESUME_KEYS)
    items = ItemLog(out / ITEMS_FILE)
    started = time.perf_counter()
    selected, skipped = _evaluate_rows(tpru, dataset, config, items, progress)
    wall_s = time.perf_counter() - started
    records = [items.records[i] for i in selected]
    report = eval_report.summarize(records, bins=config.bins)
    report.update(eval_report.header(config, tpru, dataset.describe(), skipped, wall_s))
    report["item_ids"] = selected  # what this report covers (items.jsonl may hold more from an earlier --limit)
    if config.plots and records:
        if importlib.util.find_spec("matplotlib") is None:
            log.warning("matplotlib is not installed: no plots (pip install 'tpru-agent[finetune]')")
        else:
            report["plots"] = eval_report.write_plots(report, out)
    write_json(out / REPORT_FILE, report, default=str)
    return report


def _evaluate_rows(tpru, dataset: EvalDataset, config: EvalConfig, items: ItemLog,
                   progress: Progress | None) -> tuple[list[str], list[dict]]:
    """Answer every selected row not yet in ``items`` (appending each record as it comes).

    Returns:
        The ids the report covers (resumed and new, in dataset order) and the rows skipped with the reason.
    """
    total = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    selected, skipped, done, announced = [], [], 0, False
    for row in _rows(dataset, config.limit):
        if row.id in items.records:
            selected.append(row.id)
            done += 1
            continue
        try:
            question, images = prepare_row(tpru, row, dataset.frames_budget)
        except (ConfigError, FrameError) as exc:
            skipped.append({"id": row.id, "reason": str(exc)})
            log.warning("row %s skipped: %s", row.id, exc)
            total -= 1
            continue
        if progress and not announced:
            progress(done, total, None)
            announced = True
        record = evaluate_row(tpru, row, question, images, mode=config.mode, debias=config.debias)
        items.append(record)
        selected.append(row.id)
        done += 1
        if progress:
            progress(done, total, record)
    if progress and not announced:
        progress(done, total, None)
    return selected, skipped


def _rows(dataset: EvalDataset, limit: int | None):
    for n, row in enumerate(dataset):
        if limit is not None and n >= limit:
            return
        yield row


__all__ = ["EvalConfig", "ItemLog", "answer_item", "evaluate_row", "open_model", "prepare_row",
           "run_eval", "with_effective_mode", "write_json"]
