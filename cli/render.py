"""Everything the CLI shows a person: rich tables, JSON, warnings and errors. Library code never prints."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# soft_wrap: a line is never broken mid-phrase at the width rich assumes for a pipe (80); tables still fit it
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def print_table(table: Table) -> None:
    """A table on stdout; in a pipe (no terminal, no COLUMNS) it takes the width it needs instead of rich's 80."""
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        width = console.measure(table, options=console.options.update(width=1000)).maximum
        Console(file=console.file, width=max(width, console.width), no_color=console.no_color).print(table)
        return
    console.print(table)


def emit_json(obj: Any) -> None:
    """One JSON object on stdout (machine output; nothing else is printed on stdout with --json)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    """One red line on stderr."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """One yellow line on stderr."""
    err_console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """A dim informational line on stderr."""
    err_console.print(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True)


def _timing_text(timings: dict[str, float]) -> str:
    parts = [f"{k[:-2]} {v * 1000:.0f} ms" for k, v in timings.items() if k.endswith("_s")]
    calls = int(timings.get("calls", 0))
    return ", ".join(parts) + (f" ({calls} model call{'s' if calls != 1 else ''})" if calls else "")


def show_order(result, names: list[str]) -> None:
    """Frames in predicted order with the confidence and timings."""
    console.print(f"[bold]Temporal order[/]  [dim](engine {result.engine}, mode {result.mode})[/]", highlight=False)
    table = Table()
    table.add_column("step", justify="right")
    table.add_column("frame")
    table.add_column("input #", justify="right")
    for step, index in enumerate(result.order, 1):
        table.add_row(str(step), escape(names[index]), str(index))
    print_table(table)
    console.print(f"answer [bold]{result.answer}[/]  confidence [bold]{result.confidence:.3f}[/]", highlight=False)
    if result.windows:
        agree = sum(w["agrees"] for w in result.windows)
        console.print(f"{len(result.windows)} windows of 4 frames; {agree} agree with the final order", highlight=False)
    if result.probabilities:
        top = list(result.probabilities.items())[:3]
        console.print("top orders: " + ", ".join(f"{k} {v:.3f}" for k, v in top), highlight=False)
    console.print(f"[dim]{_timing_text(result.timings)}[/]", highlight=False)


def show_choice(result, names: list[str], title: str) -> None:
    """A multiple-choice answer with every option's probability."""
    console.print(f"[bold]{title}[/]  [dim](engine {result.engine}, mode {result.mode})[/]", highlight=False)
    table = Table()
    table.add_column("option")
    table.add_column("candidate")
    table.add_column("probability", justify="right")
    for letter, value in result.options.items():
        mark = "[bold green]>[/] " if letter == result.letter else "  "
        name = "None of the choices" if value is None else names[value]
        table.add_row(mark + letter, escape(name), f"{result.probabilities[letter]:.3f}")
    print_table(table)
    picked = "none of the candidates" if result.index is None else names[result.index]
    console.print(f"answer [bold]{result.letter}[/] -> {picked}  confidence [bold]{result.confidence:.3f}[/]",
                  highlight=False)
    console.print(f"[dim]{_timing_text(result.timings)}[/]", highlight=False)


def show_verdict(verdict, observation: str) -> None:
    """Whether the observation is a valid next step; a repeated frame's verdict overrides the model's P(ok)."""
    if verdict.duplicate:
        word = (f"[bold red]no progress[/]  (the observation repeats the last history frame; model P(ok) "
                f"{verdict.confidence:.3f}, overridden)")
    else:
        word = "[bold green]valid next step[/]" if verdict.ok else "[bold red]not a valid next step[/]"
        word += f"  P(ok) = [bold]{verdict.confidence:.3f}[/]"
    console.print(f"{escape(observation)}: {word}  (engine {verdict.engine}, mode {verdict.mode})", highlight=False)
    console.print(f"[dim]{_timing_text(verdict.timings)}[/]", highlight=False)


def show_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A plain table: cells are text, never rich markup (an extra such as ``[hf]`` or a file name stays whole)."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[escape(str(c)) for c in row])
    print_table(table)
