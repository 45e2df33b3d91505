"""``tpru eval voc``: value-order correlation (VOC) of ``TPRU.progress`` on expert episodes, OpenGVL style.

Each episode from the sources (the specs of ``tpru data build``: frames, video, LeRobot, simulators) is sampled
to ``frames`` evenly spaced frames, shuffled with a seed, and given to ``TPRU.progress``; its VOC is the Spearman
correlation between the predicted values and the frames' true time order. Under ``OUT``:

- ``items.jsonl``: one line per episode (VOC, values, true indices, passes, latency...), appended and fsync'ed, so
  a rerun of the same command resumes (episodes already there are skipped, by id);
- ``report.json``: mean VOC with a 95% bootstrap interval overall, per domain and per task; ``|VOC|`` (the
  direction-free part: the classic engine guesses the direction), passes and latency per episode;
- ``voc.png``: the histogram of per-episode VOC, one colour per domain.

With ``reference="same-task"``, each episode is anchored on the previous episode of the same task and source
(the first episode of each task only serves as a reference and is not scored).

Example:
    >>> from tpru_agent.finetune.eval.voc import VocConfig, run_voc
    >>> report = run_voc(VocConfig(model="classic", sources=("metaworld:tasks=door-lock-v3,episodes=10",),
    ...                            out="runs/voc/classic"))                                   # doctest: +SKIP
    >>> report["voc"]["mean"], report["voc"]["ci95"]                                           # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import logging
import platform
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from tpru_agent.errors import ConfigError, FrameError
from tpru_agent.finetune.eval import report as eval_report
from tpru_agent.finetune.eval.run import ITEMS_FILE, REPORT_FILE, ItemLog, check_resume, with_effective_mode
from tpru_agent.finetune.eval.statistics import percentile
from tpru_agent.finetune.sources.base import Episode
from tpru_agent.finetune.sources.registry import parse_spec, plan_units, run_unit
from tpru_agent.fsutil import write_json
from tpru_agent.progress import METHODS, voc

log = logging.getLogger(__name__)

REFERENCES = ("none", "same-task")
#: Settings that must match for a rerun to resume into the same output folder.
RESUME_KEYS = ("model", "engine", "mode", "method", "reference", "seed", "frames", "sources", "template")
BOOTSTRAP = 2000


@dataclass
class VocConfig:
    """What to evaluate and where the results go.

    Attributes:
        model: name, Hub id, local folder, ONNX export folder or ``"classic"``.
        sources: ``KIND:ARGS`` episode sources (as ``tpru data build --source``).
        out: output folder; ``None`` -> ``runs/voc/<model>``.
        mode: ``fast`` (one scoring pass per window) or ``reason``.
        method: ``TPRU.progress`` method (``auto``, ``rank``, ``seriation``, ``reference``, ``anchored``).
        reference: ``none`` or ``same-task`` (anchor each episode on the previous one of its task).
        seed: seed of the frame shuffles (and of the simulator sources' episodes).
        frames: frames per episode, evenly sampled (2..64; the cost target is stated for 16).
        plots: write ``voc.png`` (needs matplotlib).
    """

    model: str = "classic"
    sources: tuple[str, ...] = ()
    out: str | None = None
    engine: str = "auto"
    mode: str = "fast"
    method: str = "auto"
    reference: str = "none"
    seed: int = 0
    frames: int = 16
    quantization: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    template: str | None = None
    base_url: str | None = None
    plots: bool = True

    def check(self) -> None:
        """Raise :class:`ConfigError` for values that cannot work."""
        if not self.sources:
            raise ConfigError("no episode source given: pass -s KIND:ARGS, e.g. -s metaworld:tasks=door-lock-v3,"
                              "episodes=10 or -s lerobot:~/data/aloha")
        for text in self.sources:
            parse_spec(text)
        if self.mode not in ("reason", "fast"):
            raise ConfigError(f"mode must be 'reason' or 'fast', got {self.mode!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.method in ("reference", "anchored") and self.reference == "none":
            raise ConfigError(f"method={self.method!r} needs a reference: pass reference='same-task' "
                              "(--reference same-task)")
        if not 2 <= self.frames <= 64:
            raise ConfigError(f"frames must be in 2..64, got {self.frames}")

    def out_dir(self) -> Path:
        """The output folder (default ``runs/voc/<model>``)."""
        if self.out:
            return Path(self.out)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(self.model)).name or str(self.model)).strip("-")
        return Path("runs") / "voc" / (slug or "model")


# ----------------------------------------------------------------------------------------------- episodes
def episodes(sources, seed: int = 0) -> Iterator[tuple[str, Episode]]:
    """``(item id, episode)`` for every episode of every source, in source order (ids ``sNN:<episode id>``)."""
    for n, text in enumerate(sources):
        spec = parse_spec(text)
        for unit in plan_units(spec, n, seed=seed):
            for ep in run_unit(unit):  # dropped episodes are logged by the source
                yield f"s{n:02d}:{ep.episode_id}", ep


def sample_indices(length: int, count: int) -> list[int]:
    """``count`` evenly spaced indices of ``range(length)`` (all of them when there are fewer)."""
    if length <= count:
        return list(range(length))
    return sorted({round(k * (length - 1) / (count - 1)) for k in range(count)})


def shuffle(item_id: str, count: int, seed: int) -> list[int]:
    """The seeded permutation an episode's frames are shown in (the same for every model)."""
    perm = list(range(count))
    random.Random(f"{seed}:{item_id}").shuffle(perm)
    return perm


def evaluate_episode(tpru, item_id: str, ep: Episode, config: VocConfig, reference: Episode | None) -> dict:
    """Progress of one shuffled episode and its VOC, as a JSONL record."""
    kept = sample_indices(len(ep.frames), config.frames)
    perm = shuffle(item_id, len(kept), config.seed)
    times = [kept[i] for i in perm]  # true frame index of each shown frame
    ref = None
    if reference is not None:
        ref = [reference.frames[i] for i in sample_indices(len(reference.frames), config.frames)]
    started = time.perf_counter()
    result = tpru.progress([ep.frames[t] for t in times], description=ep.description or None, reference=ref,
                           mode=config.mode, method=config.method)
    latency = time.perf_counter() - started
    return {"id": item_id, "episode": ep.episode_id, "domain": ep.domain, "task": ep.task,
            "voc": voc(result.values, times), "values": list(result.values), "times": times,
            "alternatives": {k: voc(v, times) for k, v in result.alternatives.items()},
            "method": result.method, "direction_known": result.direction_known, "confidence": result.confidence,
            "passes": result.passes, "latency_s": latency, "reference": None if reference is None else
            reference.episode_id, "frames": len(times)}


# ----------------------------------------------------------------------------------------------- statistics
def mean_interval(values: list[float], *, seed: int = 0, resamples: int = BOOTSTRAP) -> dict:
    """Mean with a 95% percentile-bootstrap interval (episodes resampled with replacement, seeded).

    ``scipy.stats.bootstrap`` with ``method="percentile"`` (the interval's ends are the linear-interpolated 2.5%
    and 97.5% quantiles of the resampled means), ``resamples`` resamples drawn by ``numpy.random.default_rng(seed)``.
    """
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "ci95": [mean, mean], "n": 1}
    import numpy as np
    from scipy.stats import bootstrap

    ci = bootstrap((np.asarray(values, dtype=float),), np.mean, n_resamples=resamples, vectorized=True,
                   confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return {"mean": mean, "ci95": [float(ci.low), float(ci.high)], "n": n}


def _summary(records: list[dict], seed: int) -> dict:
    vocs = [r["voc"] for r in records]
    out = mean_interval(vocs, seed=seed)
    out["abs_mean"] = sum(abs(v) for v in vocs) / len(vocs) if vocs else None
    out["median"] = percentile(vocs, 50) if vocs else None
    out["direction_known"] = sum(r["direction_known"] for r in records) / len(records) if records else None
    methods = sorted({k for r in records for k in r.get("alternatives", {})})
    out["alternatives"] = {m: mean_interval([r["alternatives"][m] for r in records if m in r["alternatives"]],
                                            seed=seed)["mean"] for m in methods}
    return out


def summarize(records: list[dict], *, seed: int = 0) -> dict:
    """VOC overall, per domain and per task; passes and latency per episode."""
    def grouped(key: str) -> dict:
        names = sorted({r[key] for r in records})
        return {name: _summary([r for r in records if r[key] == name], seed) for name in names}

    latencies = [r["latency_s"] for r in records]
    return {"voc": _summary(records, seed), "per_domain": grouped("domain"), "per_task": grouped("task"),
            "methods": sorted({r["method"] for r in records}),
            "passes": {"mean": sum(r["passes"] for r in records) / len(records) if records else None,
                       "frames": sorted({r["frames"] for r in records})},
            "latency": {"n": len(latencies), "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95)}}


def write_histogram(records: list[dict], path: Path, title: str) -> str:
    """``voc.png``: per-episode VOC histogram, one colour per domain."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    domains = sorted({r["domain"] for r in records})
    ax.hist([[r["voc"] for r in records if r["domain"] == d] for d in domains], bins=20, range=(-1, 1),
            stacked=True, label=[f"{d} (n={sum(r['domain'] == d for r in records)})" for d in domains])
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("VOC (Spearman of progress vs time, per episode)")
    ax.set_ylabel("episodes")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return eval_report._save(fig, path)


# ----------------------------------------------------------------------------------------------- the run
Progress = Callable[[int, "dict | None"], None]


def open_model(config: VocConfig):
    """Build the :class:`~tpru_agent.TPRU` the config names."""
    from tpru_agent import TPRU

    kwargs = {"base_url": config.base_url} if config.base_url else {}
    return TPRU(config.model, engine=config.engine, quantization=config.quantization, device=config.device,
                dtype=config.dtype, template=config.template, **kwargs)


def run_voc(config: VocConfig, *, model=None, progress: Progress | None = None, overwrite: bool = False) -> dict:
    """Evaluate VOC, resuming from ``OUT/items.jsonl``; returns the report (also written to ``OUT``).

    Raises:
        ConfigError: bad settings, or ``OUT`` holds a run with other settings.
    """
    config.check()
    out = config.out_dir()
    tpru = model if model is not None else open_model(config)
    config = with_effective_mode(config, tpru)
    settings = {**asdict(config), "model": str(config.model), "engine": tpru.engine_name,
                "sources": list(config.sources)}
    check_resume(out, settings, overwrite, keys=RESUME_KEYS, what="a VOC run")
    items = ItemLog(out / ITEMS_FILE)
    previous: dict[tuple[str, str], Episode] = {}
    selected, skipped, started = [], [], time.perf_counter()
    for item_id, ep in episodes(config.sources, config.seed):
        key = (item_id.split(":")[0], ep.task or ep.domain)
        reference = previous.get(key) if config.reference == "same-task" else None
        previous[key] = ep
        if config.reference == "same-task" and reference is None:
            continue  # the first episode of a task is the next one's reference
        if item_id not in items.records:
            try:
                record = evaluate_episode(tpru, item_id, ep, config, reference)
            except (ConfigError, FrameError) as exc:
                skipped.append({"id": item_id, "reason": str(exc)})
                log.warning("episode %s skipped: %s", item_id, exc)
                continue
            items.append(record)
            if progress:
                progress(len(selected) + 1, record)
        selected.append(item_id)
    records = [items.records[i] for i in selected]
    report = summarize(records, seed=config.seed)
    report.update(_header(config, tpru, skipped, time.perf_counter() - started))
    report["item_ids"] = selected
    if config.plots and records:
        if importlib.util.find_spec("matplotlib") is None:
            log.warning("matplotlib is not installed: no plot (pip install 'tpru-agent[finetune]')")
        else:
            report["plots"] = {"voc": write_histogram(records, out / "voc.png", _title(report))}
    write_json(out / REPORT_FILE, report, default=str)
    return report


def _title(report: dict) -> str:
    v = report["voc"]
    return (f"{report['model']} ({report['engine']}, {', '.join(report['methods'])}): mean VOC {v['mean']:.3f} "
            f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}], n={v['n']}")


def _header(config: VocConfig, tpru, skipped: list[dict], wall_s: float) -> dict:
    return {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": str(config.model), "engine": tpru.engine_name, "mode": config.mode, "method": config.method,
            "reference": config.reference, "seed": config.seed, "frames": config.frames,
            "sources": list(config.sources), "skipped": {"count": len(skipped), "episodes": skipped[:50]},
            "items": ITEMS_FILE, "wall_s": wall_s, "machine": platform.node(), "versions": eval_report._versions()}


__all__ = ["VocConfig", "episodes", "evaluate_episode", "mean_interval", "run_voc", "sample_indices", "shuffle",
           "summarize"]
