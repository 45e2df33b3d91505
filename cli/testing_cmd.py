"""``tpru testing build-tiny DIR``: build the offline random-weight Qwen2.5-VL used by tests and wiring demos."""

from __future__ import annotations

import click

from tpru_agent.cli import render


@click.group("testing")
def testing() -> None:
    """Offline test assets (no downloads)."""


@testing.command("build-tiny")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--size", type=click.Choice(["tiny", "nano", "mid"]), default="tiny",
              help="tiny: ~1M parameters (tests); mid: tens of millions (CPU timings).")
@click.option("--seed", type=int, default=0)
def build_tiny(path: str, size: str, seed: int) -> None:
    """Build a random-weight Qwen2.5-VL of the real architecture at PATH (answers are noise: wiring only)."""
    from tpru_agent.testing import build_tiny_checkpoint

    with render.err_console.status(f"building the {size} checkpoint ..."):
        folder = build_tiny_checkpoint(path, size=size, seed=seed)
    render.console.print(f"random-weight {size} Qwen2.5-VL checkpoint at [bold]{folder}[/] "
                         "(for tests and wiring demos; its answers mean nothing)", highlight=False)
