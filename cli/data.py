"""``tpru data``: build TPRU training / test data from episode sources, and inspect a dataset.

Example:
    tpru data build --source frames:runs/lego,domain=lego --source metaworld:tasks=drawer-open-v3,episodes=20 \\
        --out data/mine --workers 2
    tpru data show data/mine --samples 4
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from tpru_agent.cli import render
from tpru_agent.errors import ConfigError


class _RichProgress:
    """Draws a build's progress (one bar per source, one for the shards) on stderr."""

    def __init__(self, bar):
        self.bar = bar
        self.ids: dict[str, int] = {}

    def start(self, key: str, label: str, total: int) -> None:
        self.ids[key] = self.bar.add_task(label if len(label) <= 48 else label[:45] + "...", total=total, note="")

    def advance(self, key: str, steps: int = 1, note: str = "") -> None:
        self.bar.update(self.ids[key], advance=steps, note=note)


def _load_config(path: str | None) -> dict:
    if path is None:
        return {}
    file = Path(path)
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path!r} is not valid YAML: {' '.join(str(exc).split())}") from exc
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path!r} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path!r} must hold a mapping of build settings")
    return data


@click.group("data")
def data() -> None:
    """Build and inspect data in the TPRU layout (problem / images / answer parquet)."""


@data.command("build")
@click.option("--source", "-s", "sources", multiple=True,
              help="KIND:ARGS, repeatable: frames:DIR, video:DIR, lerobot:DIR[,camera=KEY], "
                   "metaworld:tasks=A+B,episodes=N, miniwob:tasks=A+B,episodes=N.")
@click.option("--out", "-o", default=None, help="Output folder (train/, test/, manifest.json).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML or JSON file of build settings (flags override it).")
@click.option("--seed", type=int, default=None, help="Seed of every random choice (default 0).")
@click.option("--samples-per-episode", type=int, default=None, help="Questions per episode (default 6).")
@click.option("--test-fraction", type=float, default=None, help="Share of episodes in test (default 0.1).")
@click.option("--holdout-task", "holdout_tasks", multiple=True, help="Task whose episodes all go to test.")
@click.option("--shard-size", type=int, default=None, help="Rows per parquet shard (default 256).")
@click.option("--workers", "-w", type=int, default=None, help="Worker processes (default 1).")
@click.option("--keep-work", is_flag=True, default=None, help="Keep the episode cache (OUT/.work).")
@click.option("--overwrite", is_flag=True, default=None,
              help="Start afresh: replace whatever build OUT holds (finished, partial or with other settings).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def build_cmd(sources, out, config_file, seed, samples_per_episode, test_fraction, holdout_tasks, shard_size,
              workers, keep_work, overwrite, as_json):
    """Turn episodes into TPRU questions with negatives; resumable (run the same command again after a crash)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tpru_agent.finetune.data.build import BuildConfig, build

    settings = _load_config(config_file)
    flags = {"sources": tuple(sources) or None, "out": out, "seed": seed, "samples_per_episode": samples_per_episode,
             "test_fraction": test_fraction, "holdout_tasks": tuple(holdout_tasks) or None, "shard_size": shard_size,
             "workers": workers, "keep_work": keep_work, "overwrite": overwrite}
    settings.update({k: v for k, v in flags.items() if v is not None})
    cfg = BuildConfig.from_dict(settings)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=render.err_console, disable=as_json) as bar:
        result = build(cfg, progress=_RichProgress(bar))
    m = result.manifest
    summary = {"out": str(result.out), "already_done": result.already_done, "samples": m["samples"],
               "episodes": {k: m["episodes"][k] for k in ("train", "test")}, "skips": m["skips"]["by_reason"],
               "content_hash": m["content_hash"]}
    if as_json:
        render.emit_json(summary)
        return
    if result.already_done:
        render.note(f"{result.out} already holds this build (same settings); nothing to do")
    _show_counts(m["counts"])
    if m["skips"]["total"]:
        reasons = ", ".join(f"{k} {v}" for k, v in m["skips"]["by_reason"].items())
        render.warn(f"{m['skips']['total']} skipped: {reasons} (details in {result.out / 'manifest.json'})")
    total = sum(m["samples"].values())
    render.note(f"wrote {total} sample{'' if total == 1 else 's'} to {result.out}  content hash "
                f"{m['content_hash'][:16]}")


def _show_counts(counts: dict) -> None:
    rows = []
    for split, c in counts.items():
        letters = " ".join(f"{k}:{v}" for k, v in c.get("answer_letters", {}).items())
        negatives = c["negatives"]["total"] if isinstance(c.get("negatives"), dict) else c.get("negatives", 0)
        tasks = ", ".join(f"{k} {v}" for k, v in c.get("tasks", {}).items())
        domains = ", ".join(f"{k} {v}" for k, v in c.get("domains", {}).items())
        rows.append([split, c.get("samples", c.get("rows", 0)), tasks, domains, letters, negatives])
    render.show_table("TPRU data", ["split", "rows", "tasks", "domains", "answer letters", "negatives"], rows)


def _image_labels(problem: str, answer: str) -> list[str]:
    """One label per image from the question's lines ('Step 2', 'Image A -> 3rd', 'C (answer)')."""
    labels = []
    for line in problem.splitlines():
        for _ in range(line.count("<image>")):
            head = line.split("<image>")[0].strip().rstrip(":.").strip()
            if head.startswith("Image ") and head[6:] in answer and len(answer) > 1:
                head += f" -> {answer.index(head[6:]) + 1}"
            elif head == answer:
                head += " (answer)"
            labels.append(head or f"image {len(labels) + 1}")
    return labels


def _sheet(picked: list, path: Path) -> Path:
    from PIL import Image

    from tpru_agent.cli.sheet import contact_sheet, save_image

    parts = []
    for n, (split, row) in enumerate(picked, 1):
        first = row.problem.splitlines()[0]
        title = (f"#{n} {split} {row.task or '?'}  answer {row.answer}" + ("  NEGATIVE" if row.negative else "")
                 + f"  | {first}")
        parts.append(contact_sheet(row.decoded(), _image_labels(row.problem, row.answer), title=title, columns=7,
                                   thumb=128))
    width = max(p.width for p in parts)
    sheet = Image.new("RGB", (width, sum(p.height for p in parts)), (255, 255, 255))
    y = 0
    for part in parts:
        sheet.paste(part, (0, y))
        y += part.height
    return save_image(sheet, path)


@data.command("show")
@click.argument("directory", type=click.Path(exists=True))
@click.option("--samples", "-n", type=int, default=4, help="Random samples to print and draw (default 4).")
@click.option("--seed", type=int, default=0, help="Seed of the random pick.")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None,
              help="Contact sheet PNG (default DIRECTORY/samples.png; 'none' to skip).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def show_cmd(directory, samples, seed, sheet, as_json):
    """Print the statistics of a TPRU dataset and draw random samples with their questions and answers."""
    from tpru_agent.finetune.data.tpru_format import sample_rows, summarize

    root = Path(directory)
    manifest_file = root / "manifest.json" if root.is_dir() else None
    manifest = json.loads(manifest_file.read_text()) if manifest_file and manifest_file.is_file() else None
    stats = summarize(root)
    picked = sample_rows(root, samples, seed=seed) if samples > 0 else []
    target = None
    if picked and (sheet or "").lower() != "none":
        target = Path(sheet) if sheet else (root if root.is_dir() else root.parent) / "samples.png"
        _sheet(picked, target)
    shown = [{"split": s, "task": r.task, "domain": r.domain, "answer": r.answer, "negative": r.negative,
              "episode_id": r.episode_id, "problem": r.problem, "images": len(r.images)} for s, r in picked]
    if as_json:
        render.emit_json({"path": str(root), "splits": stats, "manifest": manifest is not None,
                          "skips": manifest["skips"]["by_reason"] if manifest else None,
                          "samples": shown, "sheet": str(target) if target else None})
        return
    _show_counts(manifest["counts"] if manifest else stats)
    if manifest and manifest["skips"]["total"]:
        render.note("skipped: " + ", ".join(f"{k} {v}" for k, v in manifest["skips"]["by_reason"].items()))
    for n, item in enumerate(shown, 1):
        render.console.rule(f"#{n} {item['split']} {item['task']} ({item['domain']})  answer {item['answer']}"
                            + ("  negative" if item["negative"] else ""))
        render.console.print(item["problem"], highlight=False, markup=False)
    if target:
        render.note(f"contact sheet of {len(picked)} samples written to {target}")


if __name__ == "__main__":  # pragma: no cover - lets tests run the command in a subprocess without the entry point
    data()
