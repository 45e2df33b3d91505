"""Option groups several ``tpru`` verbs share (click decorators; imports only click)."""

from __future__ import annotations

import click


def runtime_options(func):
    """How a batch job (``tpru eval run``, ``tpru eval voc``) loads its model: quantisation, device, dtype, prompt
    template and server URL."""
    options = [
        click.option("--quantization", "-q", default=None, type=click.Choice(["4bit", "8bit"]),
                     help="bitsandbytes quantisation (hf engine)."),
        click.option("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:1, cpu ..."),
        click.option("--dtype", default="auto", help="auto, bfloat16, float16, float32 (hf engine)."),
        click.option("--template", type=click.Path(dir_okay=False), default=None,
                     help="Jinja preamble file (uses {{ content }}) instead of the built-in answer rules."),
        click.option("--base-url", default=None, help="openai engine: server URL, e.g. http://127.0.0.1:8000/v1"),
    ]
    for option in reversed(options):
        func = option(func)
    return func
