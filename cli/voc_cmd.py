"""``tpru eval voc``: value-order correlation of ``TPRU.progress`` on expert episodes (see finetune/eval/voc.py).

Only click, rich and the standard library load at import; the evaluation code loads inside the verb.
"""

from __future__ import annotations

import click

from tpru_agent.cli import render
from tpru_agent.cli.options import runtime_options


@click.command("voc")
@click.option("--model", "-m", required=True,
              help="Name (tpru-3b...), Hub id, local folder, ONNX export folder, or 'classic'.")
@click.option("--source", "-s", "sources", multiple=True, required=True,
              help="KIND:ARGS as for `tpru data build`, repeatable: frames:DIR, video:DIR, lerobot:DIR, "
                   "metaworld:tasks=A+B,episodes=N,frames=16, miniwob:tasks=A+B,episodes=N.")
@click.option("--out", "-o", default=None, help="Output folder (default runs/voc/<model>).")
@click.option("--engine", "-e", default="auto", type=click.Choice(["auto", "hf", "onnx", "openai", "classic"]),
              help="Runtime. auto: classic for 'classic', onnx for an export folder, else hf.")
@click.option("--mode", default="fast", show_default=True, type=click.Choice(["reason", "fast"]),
              help="fast: score each 4-frame window in one pass; reason: a chain of thought per window.")
@click.option("--method", default="auto", show_default=True,
              type=click.Choice(["auto", "rank", "seriation", "reference", "anchored"]),
              help="How progress is read from the windows (see tpru_agent/progress.py).")
@click.option("--reference", default="none", show_default=True, type=click.Choice(["none", "same-task"]),
              help="same-task: anchor each episode on the previous episode of its task (that one is not scored).")
@click.option("--frames", type=click.IntRange(2, 64), default=16, show_default=True,
              help="Frames per episode, evenly sampled, then shuffled.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffles and simulator episodes.")
@runtime_options
@click.option("--overwrite", is_flag=True, help="Discard an earlier run in --out instead of resuming it.")
@click.option("--no-plots", is_flag=True, help="Skip voc.png.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object instead of tables.")
def voc(model, sources, out, engine, mode, method, reference, frames, seed, quantization, device, dtype, template,
        base_url, overwrite, no_plots, as_json):
    """VOC of MODEL's per-frame progress on the episodes of --source (shuffled frames, Spearman vs time);
    rerun the same command to resume."""
    from tpru_agent.cli.main import effective_mode, is_classic
    from tpru_agent.finetune.eval.voc import VocConfig, run_voc

    mode = effective_mode(mode, is_classic(model, engine))
    config = VocConfig(model=model, sources=tuple(sources), out=out, engine=engine, mode=mode, method=method,
                       reference=reference, seed=seed, frames=frames, quantization=quantization, device=device,
                       dtype=dtype, template=template, base_url=base_url, plots=not no_plots)
    if as_json:
        render.emit_json(run_voc(config, overwrite=overwrite))
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=render.err_console, transient=True) as bar:
        task = bar.add_task("episodes", total=None)

        def step(done: int, record) -> None:
            bar.update(task, description=f"{done} new episodes, last {record['task'] or record['domain']} "
                                         f"VOC {record['voc']:+.2f}")

        report = run_voc(config, progress=step, overwrite=overwrite)
    show_voc(report)
    render.note(f"report: {config.out_dir() / 'report.json'}")


def _row(name: str, s: dict) -> list[str]:
    if not s["n"]:
        return [name, "0", "-", "-", "-", "-"]
    lo, hi = s["ci95"]
    return [name, str(s["n"]), f"{s['mean']:+.3f}", f"{lo:+.3f} .. {hi:+.3f}", f"{s['abs_mean']:.3f}",
            f"{s['direction_known']:.0%}"]


def show_voc(report: dict) -> None:
    """Mean VOC with intervals per domain and task, then cost."""
    rows = [_row("overall", report["voc"])]
    rows += [_row(f"domain {k}", v) for k, v in report["per_domain"].items()]
    rows += [_row(f"task {k}", v) for k, v in report["per_task"].items()]
    render.show_table(f"VOC  {report['model']}  (engine {report['engine']}, mode {report['mode']}, method "
                      f"{'/'.join(report['methods']) or report['method']})",
                      ["group", "episodes", "mean VOC", "95% interval", "mean |VOC|", "direction known"], rows)
    alt = report["voc"].get("alternatives") or {}
    if alt:
        render.note("other methods from the same passes: " + ", ".join(f"{k} {v:+.3f}" for k, v in alt.items()))
    lat = report["latency"]
    if lat["n"]:
        render.note(f"{report['passes']['mean']:.1f} passes per episode; latency p50 {lat['p50_s']:.2f} s, "
                    f"p95 {lat['p95_s']:.2f} s")
    if report["voc"]["n"] and report["voc"]["direction_known"] < 1:
        render.note("the direction of episodes without a known direction is a guess (classic engine): |VOC| is "
                    "the direction-free part; --reference same-task anchors it")


__all__ = ["voc", "show_voc"]
