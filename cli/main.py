"""``tpru``: order frames, predict next / previous steps, verify a step; plus env and model listings.

Importing this module imports no torch: the model loads inside the verbs.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import click

from tpru_agent.cli import render
from tpru_agent.errors import EngineUnavailableError, ModelNotFoundError, TPRUError, install_hint
from tpru_agent.hub import DEFAULT_MODEL, FALLBACK_MODEL

#: FALLBACK_MODEL (tpru_agent.hub, the one place it is decided) is what the CLI runs when the default model's weights
#: are missing and neither --model nor --strict is given: tpru-nano when the package ships it flagged as the
#: default, else classic.
FALLBACK_LABELS = {
    "classic": "the no-weights classic engine (visual continuity only, no TPRU model)",
    "tpru-nano": "tpru-nano, the small model shipped with the package (far weaker than TPRU-3B)",
}
FALLBACK_LABEL = FALLBACK_LABELS[FALLBACK_MODEL]

#: Top-level module -> the extra that installs it, for the one-line "missing extra" error.
EXTRA_OF = {"torch": "hf", "torchvision": "hf", "transformers": "hf", "qwen_vl_utils": "hf", "accelerate": "hf",
            "safetensors": "hf", "tokenizers": "hf", "huggingface_hub": "hf", "bitsandbytes": "quant",
            "onnxruntime": "onnx", "onnx": "onnx", "fastapi": "serve", "uvicorn": "serve", "httpx": "serve",
            "openai": "serve", "trl": "finetune", "peft": "finetune", "datasets": "finetune", "pyarrow": "finetune",
            "matplotlib": "finetune", "yaml": "finetune", "metaworld": "sim", "miniwob": "sim", "selenium": "sim",
            "gymnasium": "sim", "mujoco": "sim"}


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """"needs the [finetune] extra ..." for a module an extra installs; None for any other missing module."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    return f"this command needs the [{extra}] extra (module {top!r} is not installed). Install it: {install_hint(extra)}"


class OneLineUsageError(click.UsageError):
    """A click usage error shown as one red line with the help hint (exit code 2, as click's own)."""

    def __init__(self, original: click.UsageError):
        super().__init__(original.format_message(), original.ctx)

    def show(self, file=None) -> None:
        path = self.ctx.command_path if self.ctx is not None else "tpru"
        render.error(f"{self.message} Run `{path} --help`.")


def _short_usage_error(exc: click.UsageError, verbose: bool) -> click.UsageError:
    """``exc`` as one line, unless ``-v`` asked for click's full usage text (or it is the help of a bare group)."""
    if verbose or isinstance(exc, (OneLineUsageError, click.exceptions.NoArgsIsHelpError)):
        return exc
    return OneLineUsageError(exc)


class TPRUGroup(click.Group):
    """Turns the project's errors into one red line with the fix (exit 1), and click's usage errors into one red line
    with the help hint (exit 2); ``-v`` shows the traceback, or click's full usage text."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        verbose = any(a in ("-v", "--verbose") for a in args)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:  # an option of `tpru` itself
            raise _short_usage_error(exc, verbose) from exc

    def invoke(self, ctx: click.Context):
        verbose = bool(ctx.params.get("verbose"))
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # an unknown verb, or a bad option or argument of a verb
            raise _short_usage_error(exc, verbose) from exc
        except (TPRUError, OSError, ModuleNotFoundError) as exc:
            if verbose:
                raise
            if isinstance(exc, ModuleNotFoundError):
                message = missing_extra_message(exc)
                if message is None:
                    raise
            else:
                message = str(exc) if isinstance(exc, TPRUError) else f"{type(exc).__name__}: {exc}"
            render.error(message)
            ctx.exit(1)


@click.group(cls=TPRUGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="tpru-agent", prog_name="tpru")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Temporal and procedural understanding for robot and GUI agents (TPRU-tuned Qwen2.5-VL)."""
    ctx.obj = {"verbose": verbose}
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # the library's own tqdm bars (loading weights, writing shards) are noise between our lines
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def model_options(func):
    """The options every model-backed verb shares."""
    options = [
        click.option("--model", "-m", default=None,
                     help=f"Name (tpru-3b, tpru-7b, qwen2.5-vl-3b..., tpru-nano), Hub id, local folder, or "
                          "'classic'. "
                          f"Default {DEFAULT_MODEL}, falling back to {FALLBACK_MODEL!r} when its weights are missing."),
        click.option("--engine", "-e", default="auto", type=click.Choice(["auto", "hf", "onnx", "openai", "classic"]),
                     help="Runtime. auto: classic for 'classic', onnx for an export folder (and for tpru-nano "
                          "when onnxruntime is installed), else hf."),
        click.option("--quantization", "-q", default=None, type=click.Choice(["4bit", "8bit"]),
                     help="bitsandbytes quantisation (hf engine)."),
        click.option("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:1, cpu ..."),
        click.option("--mode", default="reason", type=click.Choice(["reason", "fast"]),
                     help="reason: chain of thought as TPRU was trained; fast: score the options in one pass."),
        click.option("--template", type=click.Path(dir_okay=False), default=None,
                     help="Jinja preamble file (uses {{ content }}) instead of the built-in answer rules."),
        click.option("--base-url", default=None, help="openai engine: server URL, e.g. http://127.0.0.1:8000/v1"),
        click.option("--debias", default=1, type=click.IntRange(1, 8), show_default=True,
                     help="fast mode only: average each multiple-choice answer over K cyclic shifts of the "
                          "candidates (counters letter position bias; K scoring passes, 2K where a None option is "
                          "also moved from last to first). reason mode ignores it."),
        click.option("--strict", is_flag=True, help=f"Never fall back to {FALLBACK_MODEL!r}."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def open_model(model: str | None, engine: str, quantization: str | None, device: str, template: str | None,
               base_url: str | None, strict: bool, debias: int = 1):
    """Load the model; without --model and --strict, fall back to FALLBACK_MODEL when the weights are missing."""
    from tpru_agent import TPRU

    kwargs = {"base_url": base_url} if base_url else {}
    if model is None and engine in ("auto", "hf"):
        # The default model is used only when it is already downloaded: a plain `tpru order` must never start a
        # 7.5 GB download (`hf download ...` or --model does that on purpose).
        kwargs["local_files_only"] = True
    name = model or DEFAULT_MODEL
    try:
        return TPRU(name, engine=engine, quantization=quantization, device=device, template=template, debias=debias,
                    **kwargs)
    except (ModelNotFoundError, EngineUnavailableError) as exc:
        if strict or model is not None or engine != "auto":
            raise
        why = "is not downloaded" if isinstance(exc, ModelNotFoundError) else f"cannot run here ({exc})"
        render.warn(f"{name} {why}; falling back to {FALLBACK_LABEL}. For the real model: {_download_hint(name)}, "
                    "or pass --model DIR; --strict refuses this fallback.")
        try:
            return TPRU(FALLBACK_MODEL, template=template, debias=debias, device=device)
        except (ModelNotFoundError, EngineUnavailableError) as again:
            if FALLBACK_MODEL == "classic":
                raise
            render.warn(f"{again}; falling back to {FALLBACK_LABELS['classic']}.")
            return TPRU("classic", template=template, debias=debias)


def is_classic(model: str | None, engine: str) -> bool:
    """Whether ``--model`` / ``--engine`` pick the classic engine (as ``TPRU`` decides it for a name)."""
    return engine == "classic" or (engine == "auto" and str(model or "").strip().lower() == "classic")


def effective_mode(mode: str, classic: bool) -> str:
    """The mode that runs: the classic engine has no chain of thought (it only scores), so ``reason`` runs as
    ``fast``; one yellow line says so when ``--mode reason`` was asked for (not when it is only the default)."""
    if mode != "reason" or not classic:
        return mode
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.get_parameter_source("mode") != click.core.ParameterSource.DEFAULT:
        render.warn("the classic engine has no reasoning mode (it only scores the options); --mode reason ran as "
                    "--mode fast")
    return "fast"


def _download_hint(name: str) -> str:
    from tpru_agent.hub import ALIASES, download_command

    target = ALIASES.get(name.lower())
    return f"`{download_command(target)}`" if target else f"download {name} (see `tpru models`)"


class _ReasonParseHint:
    """Adds "try --mode fast" to a ParseError raised in reason mode (the chain of thought ended without an answer)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from tpru_agent.errors import ParseError

        if self.mode == "reason" and isinstance(exc, ParseError):
            raise TPRUError(f"{exc}. In reason mode the model must end its reasoning with a parsable answer; "
                            "--mode fast scores the options in one pass instead and always answers") from exc
        return False


def split_inputs(values: tuple[str, ...]) -> list[str]:
    """Accept repeated flags and comma-separated lists: ``--history a.png,b.png --history c.png``.

    Pieces that together name an existing file or folder stay whole, so ``-H a,b.png`` passes the file
    ``a,b.png`` and ``-H a,b.png,c.png`` passes ``a,b.png`` and ``c.png``.
    """
    out = []
    for value in values:
        parts = value.split(",")
        i = 0
        while i < len(parts):
            j = next((j for j in range(len(parts), i + 1, -1)
                      if Path(",".join(parts[i:j])).expanduser().exists()), i + 1)
            if ",".join(parts[i:j]):
                out.append(",".join(parts[i:j]))
            i = j
    return out


def frame_names(inputs, *, video_frames: int = 4, what: str = "frames") -> list[str]:
    """Display names of the frames the loader will produce; checks that every path exists (no decoding)."""
    from tpru_agent.frames import expand_sources

    return [str(x) for x in expand_sources(inputs, video_frames=video_frames, what=what)]


@cli.command("order")
@click.argument("frames", nargs=-1, required=True)
@click.option("--description", "-d", default=None, help="The procedure in words, e.g. 'making coffee'.")
@click.option("--video-frames", type=click.IntRange(2, 64), default=4, show_default=True,
              help="Frames sampled evenly from each video input.")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None, help="Write a PNG contact sheet here.")
@model_options
def order_cmd(frames, description, video_frames, sheet, model, engine, quantization, device, mode, template,
              base_url, debias, strict, as_json):
    """Put FRAMES (files, globs, a folder or a video) in temporal order."""
    from tpru_agent.frames import load_frames
    from tpru_agent.model import MAX_ORDER_FRAMES

    inputs = list(frames)
    names = frame_names(inputs, video_frames=video_frames)
    # frames first: a typo'd path fails here, before any model is looked up or downloaded
    images = load_frames(inputs, budget=None, video_frames=video_frames, min_frames=2, max_frames=MAX_ORDER_FRAMES)
    tpru = open_model(model, engine, quantization, device, template, base_url, strict, debias)
    mode = effective_mode(mode, tpru.engine_name == "classic")
    with _ReasonParseHint(mode):
        result = tpru.order_frames(images, description=description, mode=mode)
    if sheet:
        from tpru_agent.cli.sheet import contact_sheet, save_image

        ordered = [images[i] for i in result.order]
        labels = [f"{step}. {Path(names[i]).name}" for step, i in enumerate(result.order, 1)]
        save_image(contact_sheet(ordered, labels, title=f"order {result.answer}  confidence "
                                 f"{result.confidence:.2f}  ({result.engine}, {result.mode})"), sheet)
    if as_json:
        render.emit_json({**result.to_dict(), "frames": names, "sheet": sheet})
        return
    render.show_order(result, names)
    if result.engine == "classic":
        render.note("classic engine: ordering from visual continuity alone; the direction of an unanchored "
                    "sequence is a guess (see the confidence).")
    if sheet:
        render.note(f"contact sheet written to {sheet}")


def _choice_command(kind: str):
    def run(context, candidates, goal, description, model, engine, quantization, device, mode, template, base_url,
            debias, strict, as_json, **_):
        ctx_in, cand_in = split_inputs(context), split_inputs(candidates)
        frame_names(ctx_in, what="history" if kind == "next" else "later frames")
        names = frame_names(cand_in, what="candidates")
        if goal:
            frame_names([goal], what="goal")
        tpru = open_model(model, engine, quantization, device, template, base_url, strict, debias)
        mode = effective_mode(mode, tpru.engine_name == "classic")
        with _ReasonParseHint(mode):
            if kind == "next":
                result = tpru.predict_next(ctx_in, cand_in, goal=goal, description=description, mode=mode)
            else:
                result = tpru.review_previous(ctx_in, cand_in, description=description, mode=mode)
        if as_json:
            render.emit_json({**result.to_dict(), "candidates": names})
        else:
            render.show_choice(result, names, "Next step" if kind == "next" else "Previous step")
    return run


@cli.command("next")
@click.option("--history", "-H", "context", multiple=True, required=True,
              help="Frames so far, in order (repeat the flag or separate with commas; globs and folders work).")
@click.option("--candidates", "-c", multiple=True, required=True,
              help="Candidate next frames (1..8; repeat the flag or separate with commas).")
@click.option("--goal", "-g", default=None, help="The final frame of the procedure, if known.")
@click.option("--description", "-d", default=None, help="The procedure in words.")
@model_options
def next_cmd(context, candidates, goal, description, **kw):
    """Which candidate frame comes next?"""
    _choice_command("next")(context, candidates, goal, description, **kw)


@cli.command("prev")
@click.option("--later", "-L", "context", multiple=True, required=True,
              help="The later frames, in order (repeat the flag or separate with commas).")
@click.option("--candidates", "-c", multiple=True, required=True,
              help="Candidate previous frames (1..8; repeat the flag or separate with commas).")
@click.option("--description", "-d", default=None, help="The procedure in words.")
@model_options
def prev_cmd(context, candidates, description, **kw):
    """Which candidate frame comes right before the later frames?"""
    _choice_command("prev")(context, candidates, None, description, **kw)


@cli.command("verify")
@click.argument("observation")
@click.option("--history", "-H", multiple=True, required=True,
              help="Accepted frames so far, in order (repeat the flag or separate with commas).")
@click.option("--goal", "-g", default=None, help="The final frame of the procedure, if known.")
@click.option("--description", "-d", default=None, help="The procedure in words.")
@model_options
def verify_cmd(observation, history, goal, description, model, engine, quantization, device, mode, template,
               base_url, debias, strict, as_json):
    """Is OBSERVATION a valid next step after the history? Exit 0 yes, 3 no (1 error, 2 usage)."""
    hist = split_inputs(history)
    frame_names(hist, what="history")
    frame_names([observation], what="observation")
    if goal:
        frame_names([goal], what="goal")
    tpru = open_model(model, engine, quantization, device, template, base_url, strict, debias)
    mode = effective_mode(mode, tpru.engine_name == "classic")
    with _ReasonParseHint(mode):
        verdict = tpru.verify_step(hist, observation, goal=goal, description=description, mode=mode)
    if as_json:
        render.emit_json({**verdict.to_dict(), "observation": observation})
    else:
        render.show_verdict(verdict, observation)
    sys.exit(0 if verdict.ok else 3)  # 3, not 2: click uses 2 for usage errors


#: Sub-commands other modules contribute, imported only when present (each keeps its heavy imports inside verbs).
SUBCOMMANDS = {
    "env": "tpru_agent.cli.info_cmd:env_cmd",
    "models": "tpru_agent.cli.info_cmd:models_cmd",
    "data": "tpru_agent.cli.data:data",
    "finetune": "tpru_agent.cli.finetune_cmd:finetune",
    "eval": "tpru_agent.cli.eval_cmd:eval_group",
    "export": "tpru_agent.cli.export_cmd:export",
    "serve": "tpru_agent.cli.serve_cmd:serve",
    "bench": "tpru_agent.cli.bench_cmd:bench",
    "testing": "tpru_agent.cli.testing_cmd:testing",
    "progress": "tpru_agent.cli.progress_cmd:progress",
    "label": "tpru_agent.cli.label_cmd:label",
}
#: Commands added to a group another module defines: (group, command name, target).
GROUP_SUBCOMMANDS = [("eval", "voc", "tpru_agent.cli.voc_cmd:voc")]


def _register() -> None:
    for name, target in SUBCOMMANDS.items():
        module_name, attr = target.split(":")
        if importlib.util.find_spec(module_name) is None:
            continue
        cli.add_command(getattr(importlib.import_module(module_name), attr), name)
    for group, name, target in GROUP_SUBCOMMANDS:
        module_name, attr = target.split(":")
        if group in cli.commands and importlib.util.find_spec(module_name) is not None:
            cli.commands[group].add_command(getattr(importlib.import_module(module_name), attr), name)


_register()


def main() -> None:
    """Console entry point."""
    for stream in (sys.stdout, sys.stderr):
        # a file name the terminal's encoding cannot show (or an undecodable one) prints escaped, not as a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    cli(prog_name="tpru")


if __name__ == "__main__":
    main()
