"""Shared by the loop examples: run a ProcedureChecker over frames, print a timeline, save a picture of it."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)
COLOURS = {"accepted": "green", "uncertain": "yellow", "rejected": "red"}


def one_line_errors(main):
    """Run ``main()``; the project's typed errors (no browser, no simulator, no weights) print as one red line.

    ``-v`` / ``--verbose`` on the command line keeps the traceback.
    """
    from tpru_agent.errors import TPRUError

    try:
        return main()
    except TPRUError as exc:
        if {"-v", "--verbose"} & set(sys.argv[1:]):
            raise
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1


def run_checker(model, reference, frames, *, mode: str, window: int, out: Path) -> dict:
    """Observe every frame; write ``events.jsonl`` and ``timeline.png`` under ``out``; return the run's facts."""
    from tpru_agent import ProcedureChecker
    from tpru_agent.cli.sheet import contact_sheet, save_image

    out.mkdir(parents=True, exist_ok=True)
    log = out / "events.jsonl"
    log.unlink(missing_ok=True)
    checker = ProcedureChecker(model, reference=list(reference.frames), description=reference.description,
                               window=window, mode=mode, log_path=log)
    events = [checker.observe(frame) for frame in frames]
    summary = checker.summary()
    captions = [f"{e.status.value}{' (dup)' if e.duplicate else ''} P={e.confidence:.2f}" for e in events]
    sheet = contact_sheet(list(frames), [f"t={e.step}" for e in events], captions=captions, columns=min(6, len(events)),
                          thumb=128, title=f"{reference.description}: first rejected step "
                                           f"{summary['first_rejected_step']}")
    save_image(sheet, out / "timeline.png")
    return {"events": events, "summary": summary, "flagged": summary["first_rejected_step"] is not None,
            "picture": str(out / "timeline.png"), "log": str(log)}


def report_runs(runs: dict, *, title: str, as_json: bool) -> dict:
    """Print one timeline table per run (unless JSON) and return a JSON-ready summary."""
    result = {"title": title, "runs": {}}
    for name, run in runs.items():
        result["runs"][name] = {"flagged": run["flagged"], "summary": run["summary"], "picture": run["picture"],
                                "timeline": [{"step": e.step, "status": e.status.value, "confidence": e.confidence,
                                              "matched_step": e.matched_step, "duplicate": e.duplicate}
                                             for e in run["events"]]}
        if as_json:
            continue
        table = Table(title=f"{title} | {name}", title_justify="left")
        for col in ("t", "status", "P(ok)", "ref step", "progress", "latency ms"):
            table.add_column(col, justify="right" if col != "status" else "left")
        for e in run["events"]:
            colour = COLOURS[e.status.value]
            table.add_row(str(e.step), f"[{colour}]{e.status.value}[/]{' (dup)' if e.duplicate else ''}",
                          f"{e.confidence:.2f}", "-" if e.matched_step is None else str(e.matched_step),
                          "-" if e.progress is None else f"{e.progress:.2f}", f"{e.latency_s * 1000:.0f}")
        console.print(table)
        verdict = "[red]FLAGGED[/]" if run["flagged"] else "[green]not flagged[/]"
        console.print(f"{name}: {verdict} (first rejected step {run['summary']['first_rejected_step']}); "
                      f"picture {run['picture']}", highlight=False, soft_wrap=True)
    return result
