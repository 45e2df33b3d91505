"""The builder: answers checked against ground truth read from the pixels, negatives, splits, balance, resume."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from episode_data import decode, palette, same_color, write_folders

from tpru_agent.errors import ConfigError
from tpru_agent.finetune.data.build import BuildConfig, build
from tpru_agent.finetune.data.features import frame_features, thumbs_array
from tpru_agent.finetune.data.tpru_format import read_parquet
from tpru_agent.sizing import TRAINED_FACTOR, TRAINED_MAX, TRAINED_MIN

TOY_TASKS = ["stack the red block", "slide the blue block", "push the green block"]
COLORS = palette(24, seed=1)


def _episodes() -> list[dict]:
    eps = [{"name": f"ep{i:03d}", "color": COLORS[i], "frames": 10 + i % 5, "description": TOY_TASKS[i % 3],
            "domain": "toy", "task": TOY_TASKS[i % 3]} for i in range(14)]
    eps.append({"name": "short", "color": COLORS[20], "frames": 3, "description": TOY_TASKS[0], "domain": "toy"})
    eps.append({**eps[0], "name": "copy"})                       # byte-identical frames: a duplicate episode
    eps.append({**eps[1], "name": "near", "ext": "jpg"})         # re-encoded: a near-duplicate of ep001
    return eps


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("episodes")
    write_folders(root / "toy", _episodes())
    write_folders(root / "gui", [{"name": f"run{i}", "color": COLORS[15 + i], "frames": 12, "domain": "gui",
                                  "description": ["log in", "fill the form"][i % 2]} for i in range(4)])
    return root


def _config(source: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(sources=(f"frames:{source / 'toy'}", f"frames:{source / 'gui'}"), out=str(out), **kw)


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "data"
    result = build(_config(source, out, samples_per_episode=8, shard_size=32))
    rows = {split: list(read_parquet(out / split)) for split in ("train", "test")}
    return result, rows


def _truth() -> dict[str, tuple]:
    eps = {f"frames1:toy/{e['name']}": e for e in _episodes()}
    eps.update({f"frames2:gui/run{i}": {"color": COLORS[15 + i], "frames": 12,
                                          "description": ["log in", "fill the form"][i % 2]} for i in range(4)})
    return eps


def _options(problem: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-E])\. (.+)$", problem, flags=re.M))


def _check_row(row, truth) -> None:
    ep = truth[row.episode_id]
    total, color = ep["frames"], ep["color"]
    images = row.decoded()
    assert all(TRAINED_MIN <= im.size[0] * im.size[1] <= TRAINED_MAX and im.size[0] % TRAINED_FACTOR == 0
               for im in images)
    decoded = [decode(im, total) for im in images]
    own = [same_color(c, color) for c, _ in decoded]
    options = _options(row.problem)
    none = next((k for k, v in options.items() if v.startswith("None of the choices")), None)
    described = row.problem.startswith(f"These photos show the process of {ep['description']}.")
    if row.task in ("ordering", "ordering_mcq"):
        assert all(own)
        truth_order = "".join(sorted("ABCD", key=lambda lab: decoded["ABCD".index(lab)][1]))
        steps = sorted(i for _, i in decoded)
        assert steps == sorted(set(steps)), f"two frames of one step: {steps}"
        if row.task == "ordering":
            assert row.answer == truth_order and not row.negative and described
            return
        listed = {k for k, v in options.items() if v.replace("-", "") == truth_order}
        if not row.negative:
            assert listed == {row.answer} and described
        else:
            assert row.answer == none
            assert (listed and not described) or (not listed and described)
        return
    context, candidates = decoded[:3], decoded[3:]
    assert all(own[:3])
    letters = [k for k in options if k != none]
    assert len(letters) == len(candidates) == 4
    steps = [i for _, i in context]
    if row.task == "next":
        valid = [same_color(c, color) and steps[1] < i < steps[2] for c, i in candidates]
    else:
        valid = [same_color(c, color) and i < steps[0] for c, i in candidates]
    fits = {letter for letter, ok in zip(letters, valid) if ok}
    if not row.negative:
        assert fits == {row.answer} and described, (row.problem, row.answer, candidates, steps)
    else:
        assert row.answer == none
        assert (len(fits) == 1 and not described) or (not fits and described), (fits, described)
    thumbs = thumbs_array([frame_features(im).thumb for im in images[3:]])
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(thumbs[a] - thumbs[b]).max() > 12, "near-duplicate candidates"


def test_every_answer_matches_the_pixels(built):
    _, rows = built
    truth = _truth()
    for split in rows:
        for row in rows[split]:
            _check_row(row, truth)
    assert sum(len(r) for r in rows.values()) > 100


def test_mix_balance_and_negatives(built):
    result, rows = built
    train = rows["train"]
    tasks = Counter(r.task for r in train)
    assert abs(tasks["next"] - tasks["previous"]) <= 3
    assert abs(tasks["ordering"] + tasks["ordering_mcq"] - tasks["next"]) <= 4
    five = [r for r in train if r.task != "ordering"]
    letters = Counter(r.answer for r in five)
    assert set(letters) == set("ABCDE") and max(letters.values()) / len(five) <= 0.3, letters
    nones = Counter(next(k for k, v in _options(r.problem).items() if v.startswith("None")) for r in five)
    assert set(nones) == set("ABCDE")
    negatives = [r for r in five if r.negative]
    assert 0.15 <= len(negatives) / len(five) <= 0.35
    counts = result.manifest["counts"]["train"]
    assert counts["negatives"]["total"] == len(negatives)
    assert counts["negatives"]["description_swap"] > 0 and counts["negatives"]["answer_removed"] > 0
    assert counts["max_letter_share"] <= 0.3 and counts["tasks"] == dict(sorted(tasks.items()))


def test_split_by_episode_dedup_and_skips(built):
    result, rows = built
    split_of = {r.episode_id: s for s in rows for r in rows[s]}
    train_eps = {r.episode_id for r in rows["train"]}
    assert train_eps.isdisjoint({r.episode_id for r in rows["test"]}) and rows["test"]
    listed = result.manifest["episodes"]["list"]
    assert {e["id"] for e in listed["train"]}.isdisjoint({e["id"] for e in listed["test"]})
    side = {e["id"]: s for s in listed for e in listed[s]}
    assert side["frames1:toy/near"] == side["frames1:toy/ep001"]      # near-duplicates never straddle the split
    assert result.manifest["episodes"]["near_duplicate_groups"] >= 1
    reasons = {s["episode"]: s["reason"] for s in result.manifest["skips"]["listed"]}
    twins = {"frames1:toy/copy", "frames1:toy/ep000"}
    assert len(twins & set(side)) == 1 and "frames1:toy/short" not in side      # "copy" sorts first: it is kept
    assert reasons["frames1:toy/ep000"] == "duplicate episode: same frames as frames1:toy/copy"
    assert reasons["frames1:toy/short"].startswith("too few frames")
    assert set(split_of) <= set(side)
    m = result.manifest
    assert m["samples"] == {s: len(rows[s]) for s in rows} and sum(m["files"].values()) == sum(m["samples"].values())
    assert m["seed"] == 0 and m["code_version"]["builder"] and len(m["content_hash"]) == 64
    assert [s["prefix"] for s in m["sources"]] == ["frames1", "frames2"]


def test_deterministic_across_workers_and_seed_sensitive(source, built, tmp_path):
    result, _ = built
    again = build(_config(source, tmp_path / "w2", samples_per_episode=8, shard_size=32, workers=2))
    assert again.manifest["content_hash"] == result.manifest["content_hash"]
    assert (tmp_path / "w2" / "manifest.json").read_bytes() == (result.out / "manifest.json").read_bytes()
    assert not (tmp_path / "w2" / ".work").exists()
    other = build(_config(source, tmp_path / "s1", samples_per_episode=8, shard_size=32, seed=1))
    assert other.manifest["content_hash"] != result.manifest["content_hash"]


def test_holdout_tasks_and_output_folder_rules(source, tmp_path):
    out = tmp_path / "held"
    cfg = _config(source, out, holdout_tasks=("slide the blue block",), test_fraction=0.0, samples_per_episode=3)
    result = build(cfg)
    train = list(read_parquet(out / "train"))
    test = list(read_parquet(out / "test"))
    assert test and all("slide the blue block" not in r.problem for r in train)
    assert {e["task"] for e in result.manifest["episodes"]["list"]["test"]} == {"slide the blue block"}
    assert build(cfg).already_done
    with pytest.raises(ConfigError, match="other settings"):
        build(_config(source, out, samples_per_episode=4))
    assert build(_config(source, out, samples_per_episode=2, overwrite=True)).manifest["settings"][
        "samples_per_episode"] == 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        build(_config(source, tmp_path / "foreign"))
    with pytest.raises(ConfigError, match="held-out task 'slide the blu'"):
        build(_config(source, tmp_path / "x", holdout_tasks=("slide the blu",)))
    with pytest.raises(ConfigError, match="unknown build setting 'sample_per_episode'.*samples_per_episode"):
        BuildConfig.from_dict({"sources": ["frames:x"], "out": "o", "sample_per_episode": 3})


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from tpru_agent.cli.main import main; main()", *args]


def _state(out: Path) -> str:
    """Where a killed build stopped: nothing / ingest (k unit files) / render (k shards) / done."""
    if (out / "manifest.json").exists():
        return "done"
    shards = len(list(out.glob("t*/*.parquet")))
    if shards:
        return f"render:{shards}"
    units = len(list((out / ".work" / "units").glob("*.parquet"))) if (out / ".work").exists() else -1
    return f"ingest:{units}" if units >= 0 else "nothing"


def _kill_when(args: list[str], out: Path, ready, limit: float = 60.0) -> tuple[int | None, str]:
    """Start a build and SIGKILL it as soon as ``ready(state, seconds)`` holds (polled every 10 ms)."""
    proc = subprocess.Popen(_cli(*args, "-o", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < limit:
        if ready(_state(out), time.monotonic() - start):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait(timeout=60), _state(out)


def _units(state: str) -> int:
    return int(state.split(":")[1]) if state.startswith("ingest:") else (99 if state.startswith("render") else -1)


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tmp_path):
    src = tmp_path / "src"
    write_folders(src, [{"name": f"ep{i:02d}", "color": c, "frames": 12, "description": TOY_TASKS[i % 3],
                         "domain": "toy"} for i, c in enumerate(palette(20, seed=3))])
    args = ["data", "build", "-s", f"frames:{src}", "--shard-size", "8", "--samples-per-episode", "12", "--json"]
    start = time.monotonic()
    subprocess.run(_cli(*args, "-o", str(tmp_path / "ref")), check=True, capture_output=True, timeout=120)
    full = time.monotonic() - start
    ref = tmp_path / "ref"
    reference = {name: (ref / name).read_bytes() for name in json.loads((ref / "manifest.json").read_text())["files"]}
    reference["manifest.json"] = (ref / "manifest.json").read_bytes()
    # Kill points across the whole run (3 cache units, 30 shards): early by the clock, after the first cached
    # unit, once all units are cached (planning), mid-render, late render; the first run is killed twice.
    triggers = [
        [lambda st, t: t > 0.35 * full, lambda st, t: st.startswith("render")],
        [lambda st, t: _units(st) >= 1],
        [lambda st, t: _units(st) >= 3],
        [lambda st, t: st.startswith("render:") and int(st[7:]) >= 10],
        [lambda st, t: st.startswith("render:") and int(st[7:]) >= 26],
    ]
    kills = []
    for n, chain in enumerate(triggers):
        out = tmp_path / f"run{n}"
        for ready in chain:
            kills.append((n,) + _kill_when(args, out, ready))
        subprocess.run(_cli(*args, "-o", str(out)), check=True, capture_output=True, timeout=120)
        for name, data in reference.items():
            assert (out / name).read_bytes() == data, (name, kills)
        assert not list(out.rglob(".*.tmp")) and not (out / ".work").exists() and not (out / ".lock").exists()
    interrupted = [state for _, code, state in kills if code == -signal.SIGKILL and state != "done"]
    assert len(interrupted) >= 4, kills
    assert any(s.startswith("ingest") for s in interrupted) and any(s.startswith("render") for s in interrupted), kills


def test_cli_build_with_config_file_and_flags(source, tmp_path):
    from click.testing import CliRunner

    from tpru_agent.cli.main import cli

    config = tmp_path / "build.yaml"
    config.write_text(f"sources: ['frames:{source / 'gui'}']\nsamples_per_episode: 2\nseed: 1\n")
    out = tmp_path / "o"
    done = CliRunner().invoke(cli, ["data", "build", "--config", str(config), "--seed", "3", "-o", str(out), "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["seed"] == 3 and settings["samples_per_episode"] == 2        # flags override the file
    assert sum(summary["samples"].values()) == 8 - sum(summary["skips"].values())
    config.write_text("sources: ['frames:x']\nsample_per_episode: 2\n")
    bad = CliRunner().invoke(cli, ["data", "build", "--config", str(config), "-o", str(tmp_path / "p")])
    assert bad.exit_code == 1 and "Did you mean 'samples_per_episode'" in bad.stderr


def test_cli_show_and_errors(built, tmp_path):
    from click.testing import CliRunner

    from tpru_agent.cli.main import cli

    result, _ = built
    runner = CliRunner()
    sheet = tmp_path / "sheet.png"
    shown = runner.invoke(cli, ["data", "show", str(result.out), "-n", "3", "--json", "--sheet", str(sheet)])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["splits"]["train"]["rows"] == result.manifest["samples"]["train"] and data["manifest"] is True
    assert len(data["samples"]) == 3 and all(s["problem"].count("<image>") == s["images"] for s in data["samples"])
    assert sheet.is_file() and sheet.stat().st_size > 1000
    bad = runner.invoke(cli, ["data", "build", "-s", "framez:x", "-o", str(tmp_path / "o")])
    assert bad.exit_code == 1 and "Did you mean 'frames'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = runner.invoke(cli, ["data", "build", "-s", f"frames:{tmp_path / 'nope'}", "-o", str(tmp_path / "o2")])
    assert missing.exit_code == 1 and "is not a folder" in missing.stderr
