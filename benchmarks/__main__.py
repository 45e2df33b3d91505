"""``python -m benchmarks [NAMES...]``: run the suite's benchmarks; ``--record`` adds each run to benchmarks/RESULTS.md.

A benchmark is any module ``benchmarks/<name>.py`` (not starting with ``_``) that defines ``run(args) -> dict``;
see benchmarks/README.md for the protocol. Modules are found without importing them (``--list`` is instant) and
imported only when selected. Threads are pinned (``--threads``, default 1) before any benchmark loads torch.

Examples:
    OMP_NUM_THREADS=1 python -m benchmarks --list
    OMP_NUM_THREADS=1 python -m benchmarks sdk_overhead cache --size mid --repeats 20 --record
    python -m benchmarks gpu_realsize --device cuda           # real-size 3B and 7B shapes, random weights
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as _dt
import difflib
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
VERSIONED = ("tpru-agent", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "bitsandbytes")
log = logging.getLogger("benchmarks")


# ----------------------------------------------------------------------------------------------- discovery
def discover() -> dict[str, dict]:
    """``{name: {"path", "description", "runnable"}}`` for every module in benchmarks/, read with ``ast``."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except SyntaxError as exc:
            found[path.stem] = {"path": path, "description": f"(syntax error: {exc})", "runnable": False}
            continue
        doc = (ast.get_docstring(tree) or "").strip().splitlines()
        runnable = any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in tree.body)
        found[path.stem] = {"path": path, "description": doc[0] if doc else "", "runnable": runnable}
    return found


# ----------------------------------------------------------------------------------------------- provenance
def machine() -> str:
    """CPU model, cores, memory, and the GPU when torch is loaded and sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages * page / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    text = f"{cpu} x{os.cpu_count()}{mem}"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        text += "; " + torch.cuda.get_device_name(0)
    return text


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for dist in VERSIONED:
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def flatten(figures: dict, prefix: str = "") -> dict:
    """Nested dicts become dotted keys; values stay as they are."""
    flat = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------------------------- RESULTS.md
def record(name: str, row: dict, results: Path = RESULTS) -> None:
    """Append one dated row to the benchmark's table in RESULTS.md (its section is created when missing).

    The table sits under the marker ``<!-- bench:NAME -->``; text anyone wrote elsewhere is left untouched.
    """
    marker = f"<!-- bench:{name} -->"
    header = "| date | machine | setup | versions | command | figures |\n|---|---|---|---|---|---|"
    cells = [row["date"], row["machine"], row["setup"], row["versions"], f"`{row['command']}`",
             "; ".join(f"{k}={_fmt(v)}" for k, v in row["figures"].items())]
    line = "| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |"
    from tpru_agent.fsutil import write_text

    with _locked(results):
        text = results.read_text(encoding="utf-8") if results.exists() else "# Benchmark results\n"
        lines = _insert(text.splitlines(), marker, header, line, name)
        write_text(results, "\n".join(lines).rstrip("\n") + "\n")


@contextlib.contextmanager
def _locked(results: Path):
    """An exclusive lock per RESULTS.md (a file in the temp folder), so concurrent runs never drop a row."""
    import fcntl
    import hashlib
    import tempfile

    key = hashlib.sha1(str(results.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"tpru-bench-{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _insert(lines: list[str], marker: str, header: str, line: str, name: str) -> list[str]:
    if marker in lines:
        at = lines.index(marker) + 1
        while at < len(lines) and not lines[at].startswith("|"):
            at += 1
        while at < len(lines) and lines[at].startswith("|"):
            at += 1
        lines.insert(at, line)
    else:
        lines += ["", f"## {name}", "", marker, header, line]
    return lines


# ----------------------------------------------------------------------------------------------- running
def parser(prog: str) -> argparse.ArgumentParser:
    from benchmarks import SIZES

    p = argparse.ArgumentParser(prog=prog, description="Run the tpru-agent benchmark suite.")
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--size", choices=SIZES, default=None,
                   help="model size: tiny / mid offline checkpoints, or real 3B / 7B shapes with random weights "
                        "(default: each benchmark's own, mostly mid)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1")
    p.add_argument("--repeats", type=int, default=20, help="timed repetitions per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (OMP / torch / ORT); 1 on shared machines")
    p.add_argument("--quick", action="store_true", help="smallest workloads (a smoke run, e.g. in CI)")
    p.add_argument("--workdir", default=None, help="cache / scratch folder (default $TPRU_BENCH_DIR or "
                                                   "~/.cache/tpru-agent/bench)")
    p.add_argument("--results", default=str(RESULTS), help="the RESULTS.md to append to (with --record)")
    p.add_argument("--record", action="store_true",
                   help="append a dated row per benchmark to RESULTS.md (a tracked file: only when asked)")
    p.add_argument("--no-record", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old commands
    p.add_argument("--json", dest="json_out", default=None, help="also write every result to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    return p


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Import and run one benchmark; ``{"status": ok|skipped|failed, "figures", "seconds", "error"}``."""
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        figures = module.run(args)
        if not isinstance(figures, dict):
            raise TypeError(f"benchmarks.{name}.run returned {type(figures).__name__}, not a dict of figures")
        status = "skipped" if "skipped" in figures else "ok"
        error = figures.get("skipped")
    except ImportError as exc:  # an optional extra is missing (EngineUnavailableError is an ImportError too)
        figures, status, error = {}, "skipped", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one broken benchmark must not stop the suite
        figures, status, error = {}, "failed", f"{type(exc).__name__}: {exc}"
        if args.verbose:
            traceback.print_exc()
    return {"status": status, "figures": flatten(figures), "seconds": time.perf_counter() - started,
            "error": error}


def show(name: str, result: dict) -> None:
    """Print one benchmark's figures (rich when available)."""
    title = f"{name}: {result['status']} in {result['seconds']:.1f} s" + (f" ({result['error']})"
                                                                           if result["error"] else "")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a core dependency
        print(title)
        for k, v in result["figures"].items():
            print(f"  {k} = {_fmt(v)}")
        return
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in result["figures"].items():
        table.add_row(k, _fmt(v))
    Console().print(table)


def main(argv: list[str] | None = None, *, prog: str = "python -m benchmarks") -> int:
    """Run the selected benchmarks; exit status 1 when one failed (skips are not failures)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    from benchmarks import pin_threads

    pin_threads(args.threads)
    known = discover()
    if args.list:
        for name, meta in known.items():
            flag = "" if meta["runnable"] else "  (no run(args): not part of the suite yet)"
            print(f"{name:20s} {meta['description']}{flag}")
        return 0
    for name in args.names:
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            print(f"unknown benchmark {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                  + f" Known: {', '.join(known)}", file=sys.stderr)
            return 2
    names = args.names or [n for n, meta in known.items() if meta["runnable"]]
    args.size_given = args.size is not None
    args.size = args.size or "mid"
    command = " ".join([prog, *argv])
    results, failed = {}, False
    for name in names:
        if not known[name]["runnable"]:
            results[name] = {"status": "skipped", "figures": {}, "seconds": 0.0,
                             "error": "the module defines no run(args)"}
        else:
            log.info("running %s", name)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            results[name] = run_one(name, args)
            results[name]["load1_before"] = load
        show(name, results[name])
        failed |= results[name]["status"] == "failed"
        if results[name]["status"] == "ok" and args.record and not args.no_record:
            row = {"date": _dt.date.today().isoformat(), "machine": machine(), "versions": versions(),
                   "setup": f"size {args.size}, device {args.device}, threads {args.threads}, "
                            f"repeats {args.repeats}" + (", quick" if args.quick else "")
                            + f", load avg {results[name]['load1_before']:.1f} before",
                   "command": command, "figures": results[name]["figures"]}
            record(name, row, Path(args.results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"command": command, "machine": machine(), "versions": versions(),
                                                   "results": results}, indent=2, default=str), encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
