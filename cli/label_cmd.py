"""``tpru label -s SOURCE ... -o progress.parquet``: per-frame progress labels for a dataset (finetune/eval/label.py).

Only click and rich load at import; the labelling code loads inside the verb.
"""

from __future__ import annotations

import click

from tpru_agent.cli import render


@click.command("label")
@click.option("--source", "-s", "sources", multiple=True, required=True,
              help="KIND:ARGS as for `tpru data build`, repeatable: frames:DIR, video:DIR, lerobot:DIR[,frames=32], "
                   "metaworld:tasks=A+B,episodes=N, miniwob:tasks=A+B,episodes=N.")
@click.option("--out", "-o", default="progress.parquet", show_default=True, help="The parquet file to write.")
@click.option("--model", "-m", default="classic", show_default=True,
              help="Name, Hub id, local folder, ONNX export, 'classic', or the served model's name (openai).")
@click.option("--engine", "-e", default="auto", type=click.Choice(["auto", "hf", "onnx", "openai", "classic"]),
              help="Runtime. openai: an OpenAI-compatible server (vLLM, `tpru serve`) at --base-url.")
@click.option("--base-url", default=None, help="openai engine: server URL, e.g. http://gpu-box:8000/v1")
@click.option("--api-key", default=None, envvar="TPRU_API_KEY", help="openai engine: bearer token ($TPRU_API_KEY).")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=1, show_default=True,
              help="Episodes in flight at once (more than 1 needs --engine openai).")
@click.option("--mode", default="fast", show_default=True, type=click.Choice(["reason", "fast"]),
              help="fast: score each 4-frame window in one pass; reason: a chain of thought per window.")
@click.option("--method", default="auto", show_default=True, type=click.Choice(["auto", "rank", "seriation"]),
              help="How progress is read from the window probabilities (see tpru_agent/progress.py).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of simulator sources.")
@click.option("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:1, cpu ...")
@click.option("--quantization", "-q", default=None, type=click.Choice(["4bit", "8bit"]),
              help="bitsandbytes quantisation (hf engine).")
@click.option("--overwrite", is_flag=True, help="Discard an earlier run's journal instead of resuming it.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def label(sources, out, model, engine, base_url, api_key, concurrency, mode, method, seed, device, quantization,
          overwrite, as_json):
    """Write per-frame progress (episode, frame index / timestamp, progress, confidence) for every episode;
    rerun the same command to resume after a kill."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tpru_agent.cli.main import effective_mode, is_classic
    from tpru_agent.finetune.eval.label import LabelConfig, run_label

    mode = effective_mode(mode, is_classic(model, engine))
    config = LabelConfig(sources=tuple(sources), out=out, model=model, engine=engine, base_url=base_url,
                         api_key=api_key, concurrency=concurrency, mode=mode, method=method, seed=seed,
                         device=device, quantization=quantization)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=render.err_console, transient=True, disable=as_json) as bar:
        task = bar.add_task("labelling", total=None)

        def step(resumed: int, new: int, elapsed: float) -> None:
            rate = 60 * new / elapsed if elapsed > 0 else 0.0
            bar.update(task, description=f"labelled {new} episodes ({rate:.1f}/min)"
                                         + (f", {resumed} from an earlier run" if resumed else ""))

        summary = run_label(config, progress=step, overwrite=overwrite)
    if as_json:
        render.emit_json(summary)
        return
    rate = summary["episodes_per_min"]
    render.show_table("Progress labels", ["figure", "value"],
                      [["file", summary["out"]], ["episodes", summary["episodes"]], ["rows (frames)", summary["rows"]],
                       ["new / resumed", f"{summary['new_episodes']} / {summary['resumed_episodes']}"],
                       ["episodes per minute", "-" if rate is None else f"{rate:.1f}"],
                       ["engine, concurrency", f"{summary['engine']}, {summary['concurrency']}"]])
    if summary["skipped"]:
        render.warn(f"{len(summary['skipped'])} episode(s) skipped: {summary['skipped'][0]}")


__all__ = ["label"]
