"""Evaluation reports: figures from per-item records, plots, and the paired comparison of two runs.

Every accuracy carries a 95% Wilson interval and every comparison a McNemar test (see
:mod:`tpru_agent.finetune.eval.statistics`): on TPRU-test's 461 items one point is 4-5 answers, inside the noise.

Example:
    >>> from tpru_agent.finetune.eval.report import compare_reports
    >>> diff = compare_reports("runs/base/report.json", "runs/tuned/report.json")   # doctest: +SKIP
    >>> diff["overall"]["p_mid"]                                                     # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from tpru_agent.errors import ConfigError
from tpru_agent.finetune.eval.statistics import calibration, mcnemar, percentile, proportion
from tpru_agent.fsutil import atomic_path

SCHEMA = 1
VERSIONED = ("tpru-agent", "torch", "transformers", "onnxruntime", "openai")


def _group(records: list[dict], key) -> dict[str, dict]:
    groups: dict[str, list[bool]] = {}
    for r in records:
        name = key(r)
        if name:
            groups.setdefault(str(name), []).append(bool(r["correct"]))
    return {name: proportion(sum(v), len(v)) for name, v in sorted(groups.items())}


def _distribution(values) -> dict[str, int]:
    return dict(sorted(Counter(v for v in values if v).items()))


def _tv_distance(a: dict[str, int], b: dict[str, int]) -> float | None:
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return None
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in keys)


def position_bias(records: list[dict]) -> dict:
    """Predicted answer letters against the ground truth's (choice questions), "None" rates, first labels."""
    choice = [r for r in records if r["task"] != "ordering"]
    answered = [r for r in choice if r["prediction"] is not None]
    predicted, truth = _distribution(r["prediction"] for r in answered), _distribution(r["answer"] for r in choice)
    with_none = [r for r in answered if r.get("none_letter")]
    ordering = [r for r in records if r["task"] == "ordering"]
    first_pred = _distribution(r["prediction"][0] for r in ordering if r["prediction"])
    first_true = _distribution(r["answer"][0] for r in ordering)
    return {
        "choice": {"n": len(answered), "predicted": predicted, "truth": truth,
                   "tv_distance": _tv_distance(predicted, truth)},
        "none": {"n": len(with_none),
                 "predicted_rate": (sum(r["prediction"] == r["none_letter"] for r in with_none) / len(with_none)
                                    if with_none else None),
                 "truth_rate": (sum(r["answer"] == r["none_letter"] for r in with_none) / len(with_none)
                                if with_none else None)},
        "ordering_first_label": {"n": sum(first_pred.values()), "predicted": first_pred, "truth": first_true,
                                 "tv_distance": _tv_distance(first_pred, first_true)},
    }


def summarize(records: list[dict], *, bins: int = 10) -> dict:
    """The figures of a report from per-item records (see ``evaluate.evaluate_row`` for their fields)."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    failures = sum(r["status"] == "parse_error" for r in records)
    scored = [r for r in records if r.get("confidence") is not None]
    ece, cal_bins = calibration([float(r["confidence"]) for r in scored], [bool(r["correct"]) for r in scored],
                                n_bins=bins)
    latencies = [float(r["latency_s"]) for r in records if r.get("latency_s") is not None]
    return {
        "schema": SCHEMA,
        "accuracy": proportion(correct, n),
        "per_task": _group(records, lambda r: r["task"]),
        "per_domain": _group(records, lambda r: r.get("domain")),
        "negatives": proportion(sum(bool(r["correct"]) for r in records if r["negative"]),
                                sum(bool(r["negative"]) for r in records)),
        "positives": proportion(sum(bool(r["correct"]) for r in records if not r["negative"]),
                                sum(not r["negative"] for r in records)),
        "parse_failures": {"count": failures, "rate": failures / n if n else None},
        "calibration": {
            "n": len(scored), "ece": ece,
            "brier": (sum((float(r["confidence"]) - bool(r["correct"])) ** 2 for r in scored) / len(scored)
                      if scored else None),
            "mean_confidence": sum(float(r["confidence"]) for r in scored) / len(scored) if scored else None,
            "bins": [asdict(b) for b in cal_bins],
        },
        "position_bias": position_bias(records),
        "latency": {"n": len(latencies), "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
                    "mean_s": sum(latencies) / len(latencies) if latencies else None,
                    "calls_per_item": sum(r.get("calls", 1) for r in records) / n if n else None},
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def header(config, tpru, dataset: dict, skipped: list[dict], wall_s: float) -> dict:
    """Provenance of a report: what ran on what, when, and which rows could not be evaluated."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": str(config.model), "engine": tpru.engine_name, "mode": config.mode, "debias": config.debias,
        "dataset": {**dataset, "limit": config.limit},
        "skipped": {"count": len(skipped), "rows": skipped[:50]},
        "items": "items.jsonl", "wall_s": wall_s, "machine": platform.node(), "versions": _versions(),
    }


# ----------------------------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> str:
    with atomic_path(path, ".tmp.png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return path.name


def write_plots(report: dict, out: Path) -> dict[str, str]:
    """``accuracy.png`` (bars with 95% intervals) and ``reliability.png``; returns their file names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [("overall", report["accuracy"])]
    groups += [(f"task: {k}", v) for k, v in report["per_task"].items()]
    groups += [(f"domain: {k}", v) for k, v in report["per_domain"].items()]
    groups += [(name, report[name]) for name in ("negatives", "positives") if report[name]["n"]]
    fig = Figure(figsize=(max(5.0, 0.7 * len(groups) + 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = [g["value"] or 0.0 for _, g in groups]
    errors = [[max(0.0, v - g["ci95"][0]) for v, (_, g) in zip(values, groups)],
              [max(0.0, g["ci95"][1] - v) for v, (_, g) in zip(values, groups)]]
    ax.bar(range(len(groups)), values, yerr=errors, capsize=4, color="#4C72B0")
    for i, (_, g) in enumerate(groups):
        ax.text(i, 0.02, f"n={g['n']}", ha="center", va="bottom", fontsize=7, color="white")
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.set_title(f"{report.get('model', '')} ({report.get('mode', '')})", fontsize=9)
    paths = {"accuracy": _save(fig, out / "accuracy.png")}

    cal = report["calibration"]
    fig = Figure(figsize=(4.6, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    full = [b for b in cal["bins"] if b["n"]]
    width = cal["bins"][0]["hi"] - cal["bins"][0]["lo"] if cal["bins"] else 0.1
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=width, align="edge", edgecolor="black",
           color="#4C72B0", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    total = max(1, cal["n"])
    ax.bar([b["lo"] for b in full], [b["n"] / total for b in full], width=width, align="edge", color="#DD8452",
           alpha=0.5, label="share of items")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ece = cal["ece"]
    ax.set_title("reliability" + (f"  (ECE {ece:.3f}, n={cal['n']})" if ece is not None else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    paths["reliability"] = _save(fig, out / "reliability.png")
    return paths


# ----------------------------------------------------------------------------------------------- compare
def load_items(report_path: str | Path) -> tuple[dict, dict[str, dict]]:
    """A report and its per-item records (the JSONL it names, relative to the report's folder)."""
    path = Path(report_path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} is not a report; pass the report.json written by `tpru eval run`")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{str(path)!r} is not a report (not JSON: {exc}); pass the report.json written by "
                          "`tpru eval run`") from exc
    if not isinstance(report, dict) or "accuracy" not in report:
        what = ("a dataset manifest written by `tpru data build`" if isinstance(report, dict)
                and ("content_hash" in report or "fingerprint" in report) else "not an evaluation report")
        raise ConfigError(f"{str(path)!r} is {what}, not a report; evaluate first (`tpru eval run --data DIR`) and "
                          "compare the report.json files it writes")
    items_path = path.parent / report.get("items", "items.jsonl")
    if not items_path.is_file():
        raise ConfigError(f"the per-item file {str(items_path)!r} of {str(path)!r} is missing; keep it next to "
                          "the report")
    records = {}
    for line in items_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of an interrupted run
            records[str(record["id"])] = record
    if "item_ids" in report:  # only the items the report covers
        records = {str(i): records[str(i)] for i in report["item_ids"] if str(i) in records}
    return report, records


def _paired(pairs: list[tuple[dict, dict]]) -> dict:
    n = len(pairs)
    right_a = sum(bool(a["correct"]) for a, _ in pairs)
    right_b = sum(bool(b["correct"]) for _, b in pairs)
    b = sum(bool(x["correct"]) and not y["correct"] for x, y in pairs)
    c = sum(not x["correct"] and bool(y["correct"]) for x, y in pairs)
    test = mcnemar(b, c)
    return {"n": n, "a": proportion(right_a, n), "b": proportion(right_b, n),
            "diff": (right_b - right_a) / n if n else None, "a_only_right": b, "b_only_right": c,
            "p_exact": test.p_exact, "p_mid": test.p_mid}


def _label(report: dict, path) -> dict:
    return {"report": str(path), "model": report.get("model"), "engine": report.get("engine"),
            "mode": report.get("mode")}


def compare_reports(report_a: str | Path, report_b: str | Path, *, max_changed: int = 50) -> dict:
    """Paired comparison of two runs on the items both answered: accuracies, difference, McNemar p-values.

    ``diff`` is B minus A. ``p_mid`` (McNemar mid-p) below 0.05 says the difference is unlikely to be noise.
    """
    rep_a, items_a = load_items(report_a)
    rep_b, items_b = load_items(report_b)
    shared = [i for i in items_a if i in items_b]
    if not shared:
        raise ConfigError("the two runs share no item ids: were they run on the same dataset?")
    pairs = [(items_a[i], items_b[i]) for i in shared]
    tasks = sorted({a["task"] for a, _ in pairs})
    changed = [{"id": i, "task": items_a[i]["task"], "answer": items_a[i]["answer"],
                "a": items_a[i]["prediction"], "b": items_b[i]["prediction"],
                "a_correct": bool(items_a[i]["correct"]), "b_correct": bool(items_b[i]["correct"])}
               for i in shared if bool(items_a[i]["correct"]) != bool(items_b[i]["correct"])]
    return {
        "a": _label(rep_a, report_a), "b": _label(rep_b, report_b),
        "only_a": len(items_a) - len(shared), "only_b": len(items_b) - len(shared),
        "overall": _paired(pairs),
        "per_task": {t: _paired([(a, b) for a, b in pairs if a["task"] == t]) for t in tasks},
        "changed": changed[:max_changed], "changed_count": len(changed),
    }


__all__ = ["compare_reports", "header", "load_items", "position_bias", "summarize", "write_plots"]
