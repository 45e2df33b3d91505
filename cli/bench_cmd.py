"""``tpru bench``: run the benchmark suite (``python -m benchmarks``) from a repository checkout.

The benchmarks live in the repository's ``benchmarks/`` folder, not in the installed package: the command finds
that folder from the current directory upwards. Only click and the standard library load at import.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from tpru_agent.errors import ConfigError

SIZES = ("tiny", "mid", "3b-random", "7b-random")


def find_suite(start: Path | None = None) -> Path:
    """The repository root holding ``benchmarks/__main__.py``, searched from ``start`` (cwd) upwards.

    Raises:
        ConfigError: no checkout found.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "benchmarks" / "__main__.py").is_file():
            return folder
    raise ConfigError(f"no benchmarks/ folder in {str(here)!r} or above: the suite ships with the repository, not "
                      "the package; run `tpru bench` inside a checkout of tpru-agent")


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("names", nargs=-1)
@click.option("--size", type=click.Choice(SIZES), default=None,
              help="tiny / mid offline checkpoints, or real 3B / 7B shapes with random weights "
                   "(default: each benchmark's own, mostly mid).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when available), cpu, cuda, cuda:1")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed repetitions per measurement.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads (OMP / torch / ORT); keep 1 on shared machines.")
@click.option("--quick", is_flag=True, help="Smallest workloads (a smoke run).")
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks and exit.")
@click.option("--record", is_flag=True, help="Append a dated row per benchmark to benchmarks/RESULTS.md (tracked).")
@click.option("--no-record", is_flag=True, hidden=True)  # the default now; accepted so old commands still run
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write every result to this JSON file.")
def bench(names, size, device, repeats, threads, quick, list_only, record, no_record, json_out):
    """Run benchmarks NAMES (default: all); with --record, append a dated row per benchmark to RESULTS.md."""
    root = find_suite()
    argv = list(names) + ["--device", device, "--repeats", str(repeats), "--threads", str(threads)]
    argv += ["--size", size] if size else []
    argv += ["--quick"] if quick else []
    argv += ["--list"] if list_only else []
    argv += ["--record"] if record and not no_record else []
    argv += ["--json", json_out] if json_out else []
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    suite = importlib.import_module("benchmarks.__main__")
    raise SystemExit(suite.main(argv, prog="tpru bench"))


__all__ = ["bench", "find_suite"]
