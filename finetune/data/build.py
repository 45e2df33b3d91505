"""``tpru data build``: episode sources -> the three TPRU tasks with negatives -> ``OUT/{train,test}/*.parquet``.

Pipeline (every step deterministic for a seed, every file written atomically):

1. *Ingest*: each source spec splits into units (:mod:`.sources.registry`); each unit's episodes are resized to
   the TPRU pixel budget, PNG-encoded and cached in ``OUT/.work/units/<unit>.parquet`` (workers run units in
   parallel; a unit file that exists is done).
2. *Plan* (:mod:`.plan`, :mod:`.samples`): from the cached thumbnails alone, drop duplicate / short episodes, split
   by near-duplicate group (held-out tasks to test), and render every question with the task contract.
3. *Render*: samples become ``OUT/<split>/part-NNNNN.parquet`` shards of ``shard_size`` rows (a shard that exists is
   done), then ``OUT/manifest.json`` (counts, sources, skips with reasons, seed, code version, content hash) is
   written last and the cache is removed.

A build killed at any moment (SIGKILL included) and run again with the same settings finishes the job and yields
byte-identical files (same ``content_hash``) to an uninterrupted run.

Example:
    >>> from tpru_agent.finetune.data.build import BuildConfig, build
    >>> result = build(BuildConfig(sources=("frames:runs/lego,domain=lego",), out="data/lego"))  # doctest: +SKIP
    >>> result.manifest["samples"]                                                             # doctest: +SKIP
    {'train': 5400, 'test': 600}
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tpru_agent.errors import ConfigError, close_matches
from tpru_agent.finetune.data.episode_cache import FrameStore, ingest_unit, read_unit
from tpru_agent.finetune.data.manifest import build_manifest
from tpru_agent.finetune.data.plan import Planner, _rng
from tpru_agent.finetune.data.samples import plan_samples
from tpru_agent.finetune.data.tpru_format import TPRURow, intact, write_parquet
from tpru_agent.finetune.sources.registry import Unit, parse_spec, plan_units
from tpru_agent.fsutil import write_json

log = logging.getLogger(__name__)

#: Bumped whenever the builder's output for the same inputs changes (recorded in the manifest).
BUILDER_VERSION = "1"
#: What a build owns in its output folder (``samples.png`` is where ``tpru data show`` draws by default).
OWNED = {"train", "test", "manifest.json", ".work", ".lock", "samples.png"}


@dataclass
class BuildConfig:
    """Settings of ``tpru data build`` (CLI flags and ``--config`` files map onto these fields).

    Attributes:
        sources: ``KIND:ARGS`` specs (see :mod:`.sources.registry`).
        out: output folder.
        seed: every random choice derives from it.
        samples_per_episode: questions drawn from each episode (each from its own 4-frame window).
        ordering_weight / next_weight / previous_weight: relative shares of the three tasks (default equal).
        ordering_mcq_share: share of ordering questions asked as a multiple choice of orders (default 0.3).
        negative_swap_share: share of multiple-choice questions whose description is swapped for another task's
            of the same domain, answer "None" (default 0.15; TPRU does not publish its share).
        negative_missing_share: share of multiple-choice questions whose true frame / order is left out of the
            candidates, answer "None" (default 0.10).
        in_episode_distractors: at most this many of a question's wrong candidates come from its own episode
            (default 2); the rest are the closest frames of similar episodes of the same domain.
        neighbour_episodes: similar episodes searched for cross-episode distractors (default 8).
        near_dup: two frames whose 32x32 grayscale thumbnails differ by at most this much at every pixel are
            near-duplicates (default 12 of 255): never two such frames in one question, never such episodes on
            both sides of the split.
        test_fraction: share of episodes (whole near-duplicate groups) in the test split (default 0.1).
        holdout_tasks: tasks whose episodes all go to test (never seen in training).
        shard_size: rows per parquet shard, also the resume granularity of the render step (default 256).
        workers: worker processes for ingest and render (1: run in this process).
        keep_work: keep ``OUT/.work`` (the episode cache) after a successful build.
        overwrite: start afresh: remove whatever build ``out`` holds (finished, partial, other settings).
    """

    sources: tuple[str, ...] = ()
    out: str = ""
    seed: int = 0
    samples_per_episode: int = 6
    ordering_weight: float = 1.0
    next_weight: float = 1.0
    previous_weight: float = 1.0
    ordering_mcq_share: float = 0.3
    negative_swap_share: float = 0.15
    negative_missing_share: float = 0.10
    in_episode_distractors: int = 2
    neighbour_episodes: int = 8
    near_dup: int = 12
    test_fraction: float = 0.1
    holdout_tasks: tuple[str, ...] = ()
    shard_size: int = 256
    workers: int = 1
    keep_work: bool = False
    overwrite: bool = False
    #: Digest of the local source files (names, sizes, modification times), filled in by :func:`build`.
    source_state: str = ""
    #: Fields that do not change the dataset (left out of :meth:`settings_digest`).
    RUNTIME = ("out", "workers", "keep_work", "overwrite")

    def __post_init__(self):
        self.sources = tuple(self.sources)
        self.holdout_tasks = tuple(self.holdout_tasks)
        if not self.sources:
            raise ConfigError("no sources; pass at least one --source KIND:ARGS (e.g. frames:runs/)")
        if not self.out:
            raise ConfigError("no output folder; pass --out DIR")
        for name in ("samples_per_episode", "shard_size", "workers", "neighbour_episodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("ordering_mcq_share", "negative_swap_share", "negative_missing_share", "test_fraction"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.negative_swap_share + self.negative_missing_share > 1.0:
            raise ConfigError("negative_swap_share + negative_missing_share must not exceed 1")
        if min(self.ordering_weight, self.next_weight, self.previous_weight) < 0 or \
                self.ordering_weight + self.next_weight + self.previous_weight <= 0:
            raise ConfigError("task weights must be >= 0 with a positive sum")
        if not 0 <= self.in_episode_distractors <= 4:
            raise ConfigError(f"in_episode_distractors must be in 0..4, got {self.in_episode_distractors}")
        if not 0 <= self.near_dup <= 255:
            raise ConfigError(f"near_dup must be in 0..255, got {self.near_dup}")

    @classmethod
    def from_dict(cls, data: dict) -> "BuildConfig":
        """Build from a config file's mapping; unknown keys fail with a close-match suggestion."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields:
                raise ConfigError(f"unknown build setting {key!r}." + close_matches(key, fields) +
                                  f" Settings: {', '.join(fields)}")
        return cls(**{key: _typed(key, value, fields[key].default) for key, value in data.items()})

    def settings(self) -> dict:
        """The fields that determine the dataset (JSON-ready)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self) if f.name not in self.RUNTIME}

    def settings_digest(self) -> str:
        """Hash of the settings, the source files' state (names, sizes, times) and the builder's version.

        Stored under the ``"fingerprint"`` key of the build stamp and the manifest (the key older builds have); not
        to be confused with :func:`tpru_agent.images.fingerprint`, the content hash of one image.
        """
        from tpru_agent import __version__

        text = json.dumps({"settings": self.settings(), "builder": BUILDER_VERSION, "tpru_agent": __version__},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Progress:
    """What a build reports while it runs (the CLI draws it with rich; the default ignores it)."""

    def start(self, key: str, label: str, total: int) -> None:
        """A new bar: ``total`` steps."""

    def advance(self, key: str, steps: int = 1, note: str = "") -> None:
        """``steps`` more done; ``note`` is a short status such as '12 episodes'."""


@dataclass
class BuildResult:
    """What :func:`build` made: the folder, the manifest, and whether it only found a finished build."""

    out: Path
    manifest: dict = field(repr=False)
    already_done: bool = False


def _has_samples(out: Path) -> bool:
    return (out / "manifest.json").exists() or any((out / d).exists() for d in ("train", "test"))


def _wrote_nothing(out: Path) -> bool:
    """True when a folder holds no finished or cached work: no manifest, no shard, no cached unit."""
    return not (_has_samples(out) or any((out / ".work" / "units").glob("*.parquet")))


def _settings_digest_in(file: Path) -> str | None:
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return "unreadable"   # a torn or foreign file: treated as another build's


def _clear(out: Path) -> None:
    for name in OWNED - {".lock"}:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def _prepare(cfg: BuildConfig, out: Path) -> None:
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWNED)
    if foreign:
        raise ConfigError(f"output folder {str(out)!r} holds other files ({foreign[:4]}); pick an empty or new folder")
    work = out / ".work"
    manifest = out / "manifest.json"
    stamp = work / "config.json"
    previous = None
    if manifest.is_file():
        previous = _settings_digest_in(manifest)
    elif stamp.is_file():
        previous = _settings_digest_in(stamp)
    other = previous not in (None, cfg.settings_digest()) or (previous is None and _has_samples(out))
    if cfg.overwrite or (other and not _has_samples(out)):
        _clear(out)   # --overwrite starts afresh; a build that never wrote a sample blocks nothing
    elif other:
        raise ConfigError(f"{str(out)!r} holds a build with other settings; pass --overwrite to replace it, "
                          "or pick another --out")
    (work / "units").mkdir(parents=True, exist_ok=True)
    for tmp in out.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)             # leftovers of a killed run (never renamed into place)
    write_json(stamp, {"fingerprint": cfg.settings_digest(), "settings": cfg.settings()}, sort_keys=True)


def _pool(workers: int):
    # spawn: simulator workers create their own GL contexts; forked copies of a parent's state are not safe.
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) if workers > 1 else None


def _run_jobs(pool, func, jobs: list[tuple], on_done) -> None:
    if pool is None:
        for job in jobs:
            on_done(job, func(*job))
        return
    futures = {pool.submit(func, *job): job for job in jobs}
    for future in as_completed(futures):
        on_done(futures[future], future.result())


def _prefixes(specs) -> list[str]:
    kinds = [s.kind for s in specs]
    seen: dict[str, int] = {}
    out = []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        out.append(kind if kinds.count(kind) == 1 else f"{kind}{seen[kind]}")
    return out


def _render_shard(rows: list[tuple], path: str, order_seed: str) -> int:
    """Write one output shard: ``rows`` are (spec fields, [(unit path, row, frame, name)])."""
    store = FrameStore()
    out = []
    for spec, refs in rows:
        images = tuple(store.get(p, r, f) for p, r, f, _ in refs)
        out.append(TPRURow(problem=spec["problem"], images=images, answer=spec["answer"], task=spec["task"],
                           domain=spec["domain"], negative=bool(spec["negative"]), episode_id=spec["episode_id"],
                           names=tuple(name for *_, name in refs)))
    _rng(order_seed).shuffle(out)
    return write_parquet(out, path)


def build(cfg: BuildConfig, *, progress: Progress | None = None) -> BuildResult:
    """Run (or resume) a build; see the module docstring.

    Raises:
        ConfigError: bad settings or sources, or ``out`` holds something else.
    """
    progress = progress or Progress()
    cfg = dataclasses.replace(cfg, source_state=sources_state(cfg.sources))  # changed inputs = another build
    out = Path(cfg.out).expanduser()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # An OS lock (released when the process dies, SIGKILL included): one build per folder at a time.
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        raise ConfigError(f"another build is writing {str(out)!r}; wait for it or pick another --out") from exc
    try:
        _prepare(cfg, out)
        manifest_path = out / "manifest.json"
        if manifest_path.is_file():
            if not cfg.keep_work:
                shutil.rmtree(out / ".work", ignore_errors=True)
            (out / ".lock").unlink(missing_ok=True)
            return BuildResult(out, json.loads(manifest_path.read_text()), already_done=True)
        result = _build_locked(cfg, out, progress)
        (out / ".lock").unlink(missing_ok=True)   # a finished dataset folder holds only the dataset
        return result
    except BaseException:
        (out / ".lock").unlink(missing_ok=True)
        if _wrote_nothing(out):   # a failed start leaves no trace (the corrected command then runs as new)
            shutil.rmtree(out / ".work", ignore_errors=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    finally:
        lock.close()


def _build_locked(cfg: BuildConfig, out: Path, progress: Progress) -> BuildResult:
    specs = [parse_spec(text) for text in cfg.sources]
    units = [u for i, spec in enumerate(specs) for u in plan_units(spec, i, seed=cfg.seed)]
    prefixes = _prefixes(specs)
    unit_dir = out / ".work" / "units"
    path_of = {u.key: str(unit_dir / f"{u.key}.parquet") for u in units}
    for i, spec in enumerate(specs):
        mine = [u for u in units if u.source == i]
        progress.start(f"source{i}", spec.text, len(mine))
        done = sum(Path(path_of[u.key]).is_file() for u in mine)
        progress.advance(f"source{i}", done, "cached" if done else "")
    todo = [(u, prefixes[u.source], path_of[u.key]) for u in units if not intact(Path(path_of[u.key]))]
    with_pool = _pool(cfg.workers)   # worker processes start on the first job only
    try:
        _run_jobs(with_pool, ingest_unit, todo,
                  lambda job, r: progress.advance(f"source{job[0].source}", 1, f"{r['episodes']} episodes"))
        records, skips = _load_records(units, path_of, specs, prefixes)
        planner = Planner(records, cfg)
        usable = planner._usable()
        if not usable:
            raise ConfigError(f"no usable episodes in {list(cfg.sources)} ({len(skips) + len(planner.skips)} "
                              "skipped; see the reasons with --keep-work in .work/units) — check the sources")
        planner.assign_splits(usable)
        if cfg.test_fraction < 1 and not any(v == "train" for v in planner.split_of.values()):
            raise ConfigError(f"every usable episode ({len(usable)}) went to the test split (held-out tasks "
                              f"{list(cfg.holdout_tasks)}, test fraction {cfg.test_fraction}): nothing is left to "
                              "train on; hold out fewer tasks or add episodes (--test-fraction 1 builds a test set)")
        planner.find_neighbours(usable)
        samples = plan_samples(planner, usable)
        jobs = _shard_jobs(samples, planner, path_of, out, cfg)
        progress.start("render", "write shards", len(jobs))
        pending = [job for job in jobs if not intact(Path(job[1]), rows=len(job[0]))]
        progress.advance("render", len(jobs) - len(pending))
        _run_jobs(with_pool if len(pending) > 1 else None, _render_shard, pending,
                  lambda job, n: progress.advance("render", 1, f"{n} rows"))
    finally:
        if with_pool is not None:
            with_pool.shutdown(cancel_futures=True)
    manifest = build_manifest(cfg, specs, prefixes, units, planner, samples, skips, out, BUILDER_VERSION)
    write_json(out / "manifest.json", manifest, sort_keys=True)
    if not cfg.keep_work:
        shutil.rmtree(out / ".work", ignore_errors=True)
    return BuildResult(out, manifest)


def _load_records(units: list[Unit], path_of: dict, specs, prefixes: list[str]) -> tuple[list, list]:
    records, skips = [], []
    for unit in units:
        path = Path(path_of[unit.key])
        try:
            recs, unit_skips = read_unit(path, unit, len(records))
        except (OSError, ValueError, KeyError) as exc:   # damaged cache file (pyarrow's errors subclass these): ingest the unit again
            log.warning("cache file %s is damaged (%s); ingesting it again", path, exc)
            path.unlink(missing_ok=True)
            ingest_unit(unit, prefixes[unit.source], str(path))
            recs, unit_skips = read_unit(path, unit, len(records))
        records.extend(recs)
        skips.extend([specs[unit.source].text, eid, reason] for eid, reason in unit_skips)
    return records, skips


def _shard_jobs(samples: dict, planner: Planner, path_of: dict, out: Path, cfg: BuildConfig) -> list[tuple]:
    jobs = []
    for split, specs in samples.items():
        for start in range(0, len(specs), cfg.shard_size):
            rows = []
            for s in specs[start:start + cfg.shard_size]:
                refs = [(path_of[planner.records[g].unit], planner.records[g].row, f,
                         f"{planner.records[g].episode_id}#{f}.png") for g, f in s.images]
                rows.append(({"problem": s.problem, "answer": s.answer, "task": s.task, "domain": s.domain,
                              "negative": s.negative, "episode_id": s.episode_id}, refs))
            index = start // cfg.shard_size
            path = out / split / f"part-{index:05d}.parquet"
            jobs.append((rows, str(path), f"{cfg.seed}:{split}:{index}"))
    return jobs


def _typed(key: str, value, default):
    """A config-file value in its field's type: a lone string for a list field becomes a one-item list."""
    if isinstance(default, tuple):
        return (value,) if isinstance(value, str) else tuple(value or ())
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"build setting {key!r} must be true or false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        try:
            return type(default)(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"build setting {key!r} must be a {type(default).__name__}, got {value!r}") from exc
    return value


def sources_state(sources) -> str:
    """Digest of every local source file's relative name, size and modification time (simulators: their spec).

    Part of the build's settings digest, so adding, removing or editing source files makes a rerun refuse to resume the
    old build (``--overwrite`` replaces it) instead of returning a stale dataset.
    """
    digest = hashlib.sha256()
    for text in sources:
        spec = parse_spec(text)
        digest.update(text.encode())
        root = Path(str(spec.args.get("path", ""))).expanduser() if "path" in spec.args else None
        if root is None or not root.exists():
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            st = path.stat()
            name = os.fsencode(path.relative_to(root) if path != root else path.name)  # any bytes, UTF-8 or not
            digest.update(name + f":{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
