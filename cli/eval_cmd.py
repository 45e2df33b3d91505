"""``tpru eval run`` (accuracy with intervals, calibration, plots; resumable) and ``tpru eval compare``.

Only click, rich and the standard library load at import; the evaluation code loads inside the verbs.
"""

from __future__ import annotations

import click

from tpru_agent.cli import render
from tpru_agent.cli.options import runtime_options


class _DefaultRun(click.Group):
    """``tpru eval --model M --data D`` means ``tpru eval run --model M --data D`` (the form users type first)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0].startswith("-") and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("eval", cls=_DefaultRun, context_settings={"help_option_names": ["-h", "--help"]})
def eval_group() -> None:
    """Evaluate a model on a TPRU-layout dataset (`tpru eval run ...`, or `tpru eval --model ...` for short), and
    compare two evaluation runs (`tpru eval compare A.json B.json`)."""


@eval_group.command("run")
@click.option("--model", "-m", default=None,
              help="Name (tpru-3b, qwen2.5-vl-7b...), Hub id, local folder, ONNX export folder, or 'classic' "
                   "(--engine classic alone is enough).")
@click.option("--data", "-d", required=True, type=click.Path(exists=True),
              help="TPRU-layout dataset: a parquet file, a folder of them (DIR/*.parquet, DIR/{train,test}/), or "
                   "a datasets.save_to_disk folder.")
@click.option("--engine", "-e", default="auto", type=click.Choice(["auto", "hf", "onnx", "openai", "classic"]),
              help="Runtime. auto: classic for 'classic', onnx for an export folder, else hf.")
@click.option("--mode", default="reason", show_default=True, type=click.Choice(["reason", "fast"]),
              help="reason: chain of thought as TPRU was trained; fast: score the answers in one pass.")
@click.option("--split", default="auto", show_default=True,
              help="auto (the test split when there is one, else every file), all, or a split name.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N rows.")
@click.option("--debias", type=click.IntRange(min=1), default=1, show_default=True,
              help="fast mode only: average each multiple-choice answer over K cyclic shifts of the candidates "
                   "(counters letter position bias; K scoring passes per row, the None option stays where the "
                   "dataset put it). reason mode refuses K > 1.")
@click.option("--out", "-o", default=None, help="Output folder (default runs/eval/<model>-<mode>).")
@click.option("--overwrite", is_flag=True, help="Discard an earlier run in --out instead of resuming it.")
@runtime_options
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="reason mode: reasoning budget.")
@click.option("--min-pixels", type=click.IntRange(min=1), default=None,
              help="Pixel budget: smallest frame area after resizing (default: the model's own, else 16384).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Pixel budget: largest frame area after resizing (default: the model's own, else 36864). "
                   "Evaluate a model at the budget it was trained at.")
@click.option("--bins", type=click.IntRange(min=1), default=10, show_default=True, help="Reliability-diagram bins.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object instead of tables.")
def run_cmd(model, data, engine, mode, split, limit, debias, out, overwrite, quantization, device, dtype, template,
            base_url, max_new_tokens, min_pixels, max_pixels, bins, no_plots, as_json):
    """Evaluate MODEL on the dataset at --data; rerun the same command to resume an interrupted run."""
    from tpru_agent.cli.main import effective_mode, is_classic
    from tpru_agent.finetune.eval.run import EvalConfig, run_eval

    if model is None:
        if engine != "classic":
            raise click.UsageError("Missing option '--model' / '-m' (or pass --engine classic for the no-weights "
                                   "baseline).")
        model = "classic"
    mode = effective_mode(mode, is_classic(model, engine))  # recorded as what runs (the default out folder too)
    config = EvalConfig(model=model, data=data, out=out, engine=engine, mode=mode, split=split, limit=limit,
                        debias=debias, quantization=quantization, device=device, dtype=dtype, template=template,
                        base_url=base_url, max_new_tokens=max_new_tokens, bins=bins, plots=not no_plots,
                        min_pixels=min_pixels, max_pixels=max_pixels)
    if as_json:
        report = run_eval(config, overwrite=overwrite)
        render.emit_json(report)
        return
    with _Progress() as progress:
        report = run_eval(config, progress=progress, overwrite=overwrite)
    show_report(report)
    render.note(f"report: {config.out_dir() / 'report.json'}  items: {config.out_dir() / report['items']}")


class _Progress:
    """A rich progress bar on stderr; the instance is ``run_eval``'s progress callback."""

    def __enter__(self) -> "_Progress":
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[acc]}"), TimeRemainingColumn(), console=render.err_console,
                            transient=True)
        self.task = self.bar.add_task("eval", total=None, acc="")
        self.right = 0
        self.bar.__enter__()
        return self

    def __call__(self, done: int, total: int, record) -> None:
        if record is not None:
            self.right += bool(record["correct"])
        acc = f"new items {self.right} right" if record is not None else ""
        self.bar.update(self.task, completed=done, total=total, acc=acc)

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


def _pct(prop: dict) -> list[str]:
    if not prop["n"]:
        return ["0", "-", "-"]
    lo, hi = prop["ci95"]
    return [str(prop["n"]), f"{100 * prop['value']:.1f}", f"{100 * lo:.1f} - {100 * hi:.1f}"]


def show_report(report: dict) -> None:
    """The report as tables: accuracy groups with intervals, then failures, calibration, bias and latency."""
    rows = [["overall", *_pct(report["accuracy"])]]
    rows += [[f"task {k}", *_pct(v)] for k, v in report["per_task"].items()]
    rows += [[f"domain {k}", *_pct(v)] for k, v in report["per_domain"].items()]
    rows += [[name, *_pct(report[name])] for name in ("negatives", "positives") if report[name]["n"]]
    title = f"Accuracy  {report['model']}  (engine {report['engine']}, mode {report['mode']})"
    render.show_table(title, ["group", "n", "accuracy %", "95% interval %"], rows)
    cal, bias, lat = report["calibration"], report["position_bias"], report["latency"]
    facts = [["parse failures", f"{report['parse_failures']['count']} "
                                f"({100 * (report['parse_failures']['rate'] or 0):.1f}%)"],
             ["skipped rows (malformed)", str(report["skipped"]["count"])],
             ["ECE / Brier", _num(cal["ece"]) + " / " + _num(cal["brier"])],
             ["mean confidence", _num(cal["mean_confidence"])],
             ["letters predicted", _dist(bias["choice"]["predicted"])],
             ["letters truth", _dist(bias["choice"]["truth"])],
             ["'None' rate predicted / truth",
              _num(bias["none"]["predicted_rate"]) + " / " + _num(bias["none"]["truth_rate"])],
             ["latency p50 / p95 (s)", _num(lat["p50_s"]) + " / " + _num(lat["p95_s"])]]
    render.show_table("Details", ["figure", "value"], facts)


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _dist(counts: dict) -> str:
    total = sum(counts.values())
    return " ".join(f"{k}:{v / total:.0%}" for k, v in counts.items()) if total else "-"


@eval_group.command("compare")
@click.argument("report_a", type=click.Path(exists=True))
@click.argument("report_b", type=click.Path(exists=True))
@click.option("--show", type=click.IntRange(min=0), default=10, show_default=True,
              help="List this many items whose correctness changed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def compare_cmd(report_a, report_b, show, as_json):
    """Compare two runs (their report.json files) item by item, with McNemar's paired test.

    "A only" / "B only" count the items only that run got right; McNemar's p-values come from them.
    """
    from tpru_agent.finetune.eval.report import compare_reports

    diff = compare_reports(report_a, report_b)
    if as_json:
        render.emit_json(diff)
        return
    rows = []
    for name, d in [("overall", diff["overall"]), *diff["per_task"].items()]:
        rows.append([name, str(d["n"]), f"{100 * (d['a']['value'] or 0):.1f}", f"{100 * (d['b']['value'] or 0):.1f}",
                     f"{100 * (d['diff'] or 0):+.1f}", str(d["a_only_right"]), str(d["b_only_right"]),
                     f"{d['p_exact']:.3g}", f"{d['p_mid']:.3g}"])
    a, b = diff["a"], diff["b"]
    render.show_table(f"A = {a['model']} ({a['mode']})   B = {b['model']} ({b['mode']})",
                      ["group", "n", "A %", "B %", "B-A", "A only", "B only", "p exact", "mid-p"], rows)
    if diff["only_a"] or diff["only_b"]:
        render.warn(f"{diff['only_a']} item(s) only in A and {diff['only_b']} only in B are left out of the pairing")
    p = diff["overall"]["p_mid"]
    verdict = "unlikely to be noise" if p < 0.05 else "within the noise of this test set"
    render.note(f"overall difference {100 * (diff['overall']['diff'] or 0):+.1f} points, McNemar mid-p {p:.3g}: "
                f"{verdict}")
    if show and diff["changed"]:
        render.show_table(f"Items whose correctness changed ({diff['changed_count']})",
                          ["id", "task", "truth", "A", "B"],
                          [[c["id"], c["task"], c["answer"], _mark(c["a"], c["a_correct"]),
                            _mark(c["b"], c["b_correct"])] for c in diff["changed"][:show]])


def _mark(prediction, correct: bool) -> str:
    return f"{prediction or '(parse error)'} {'ok' if correct else 'x'}"


__all__ = ["eval_group", "show_report"]
