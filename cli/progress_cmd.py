"""``tpru progress FRAMES|VIDEO [--json] [--plot out.png]``: per-frame task progress and its picture.

Only click and rich load at import; the model loads inside the verb.
"""

from __future__ import annotations

from pathlib import Path

import click

from tpru_agent.cli import render


@click.command("progress")
@click.argument("frames", nargs=-1, required=True)
@click.option("--description", "-d", default=None, help="The procedure in words, e.g. 'opening a drawer'.")
@click.option("--reference", "-r", multiple=True,
              help="Frames of a demonstration of the same task, in time order (files, a folder or a video); anchors "
                   "the values and gives the classic engine a direction.")
@click.option("--method", default="auto", show_default=True,
              type=click.Choice(["auto", "rank", "seriation", "reference", "anchored"]),
              help="How progress is read from the window probabilities (see tpru_agent/progress.py).")
@click.option("--video-frames", type=click.IntRange(2, 64), default=16, show_default=True,
              help="Frames sampled evenly from a video.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of progress against frame index (over the frames' thumbnails) here.")
@click.option("--model", "-m", default=None,
              help="Name (tpru-3b...), Hub id, local folder, or 'classic'. Default tpru-3b, falling back to the "
                   "classic engine when its weights are missing.")
@click.option("--engine", "-e", default="auto", type=click.Choice(["auto", "hf", "onnx", "openai", "classic"]),
              help="Runtime. auto: classic for 'classic', onnx for an export folder, else hf.")
@click.option("--quantization", "-q", default=None, type=click.Choice(["4bit", "8bit"]),
              help="bitsandbytes quantisation (hf engine).")
@click.option("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:1, cpu ...")
@click.option("--mode", default="fast", show_default=True, type=click.Choice(["reason", "fast"]),
              help="fast: score each 4-frame window in one pass; reason: a chain of thought per window.")
@click.option("--template", type=click.Path(dir_okay=False), default=None,
              help="Jinja preamble file (uses {{ content }}) instead of the built-in answer rules.")
@click.option("--base-url", default=None, help="openai engine: server URL, e.g. http://127.0.0.1:8000/v1")
@click.option("--strict", is_flag=True, help="Never fall back to the classic engine.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def progress(frames, description, reference, method, video_frames, plot, model, engine, quantization, device, mode,
             template, base_url, strict, as_json):
    """Task progress (0 = start, 1 = done) of each of FRAMES (files, globs, a folder or a video; any order)."""
    from tpru_agent.cli.main import effective_mode, open_model, split_inputs
    from tpru_agent.frames import expand_sources, load_frames

    inputs = list(frames)
    source = inputs if len(inputs) > 1 else inputs[0]
    ref = split_inputs(reference) or None
    tpru = open_model(model, engine, quantization, device, template, base_url, strict)
    mode = effective_mode(mode, tpru.engine_name == "classic")
    result = tpru.progress(source, description=description, reference=ref, mode=mode, method=method,
                           video_frames=video_frames)
    names = [str(x) for x in expand_sources(inputs, video_frames=video_frames)]
    if plot:
        from tpru_agent.cli.progress_plot import progress_plot
        from tpru_agent.cli.sheet import save_image

        images = load_frames(source, budget=None, video_frames=video_frames)
        save_image(progress_plot(images, result), plot)
    if as_json:
        render.emit_json({**result.to_dict(), "frames": names, "plot": plot})
        return
    show_progress(result, names)
    if not result.direction_known:
        render.note(f"{result.engine} engine: the direction is a guess (taken from the input order); pass "
                    "--reference DEMO to anchor it.")
    if plot:
        render.note(f"plot written to {plot}")


def show_progress(result, names: list[str]) -> None:
    """One row per input frame: progress as a number and a bar, and the frame's confidence."""
    rows = []
    for i, (name, value, conf) in enumerate(zip(names, result.values, result.frame_confidence)):
        bar = "#" * round(20 * value)
        rows.append([str(i), Path(name).name if len(name) > 40 else name, f"{value:.3f}", f"{bar:<20}",
                     f"{conf:.2f}"])
    render.show_table(f"Progress  (engine {result.engine}, mode {result.mode}, method {result.method})",
                      ["#", "frame", "progress", "", "confidence"], rows)
    order = " ".join(str(i) for i in result.order)
    calls = result.passes
    render.console.print(f"implied order {order}  confidence [bold]{result.confidence:.3f}[/]  "
                         f"[dim]{calls} pass{'es' if calls != 1 else ''}, {result.timings['total_s'] * 1000:.0f} ms"
                         "[/]", highlight=False)


__all__ = ["progress", "show_progress"]
