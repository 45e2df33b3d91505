"""``tpru eval voc``, ``tpru label`` and ``tpru progress`` on small synthetic episodes (frames folders, LeRobot),
with the classic engine, the pixel oracle and the tiny Qwen2.5-VL."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from episode_data import palette, write_folders, write_lerobot
from oracle import PixelOracle
from oracle import frame as oracle_frame

from tpru_agent import TPRU, ConfigError
from tpru_agent.cli.main import cli
from tpru_agent.finetune.eval.label import LabelConfig, run_label
from tpru_agent.finetune.eval.voc import VocConfig, mean_interval, run_voc, sample_indices, shuffle

pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture
def frames_source(tmp_path):
    colors = palette(4, seed=3)
    eps = [{"name": f"ep{i}", "color": colors[i], "frames": 8 + i, "task": "slide" if i % 2 else "push",
            "domain": "toy"} for i in range(4)]
    write_folders(tmp_path / "eps", eps)
    return f"frames:{tmp_path / 'eps'}"


def test_sample_and_shuffle_are_deterministic():
    assert sample_indices(5, 16) == [0, 1, 2, 3, 4]
    assert sample_indices(31, 4) == [0, 10, 20, 30]
    assert shuffle("a", 10, 0) == shuffle("a", 10, 0) != shuffle("b", 10, 0)
    assert sorted(shuffle("a", 10, 0)) == list(range(10))


def test_mean_interval_brackets_the_mean():
    s = mean_interval([0.2, 0.4, 0.6, 0.8], seed=1)
    assert s["mean"] == pytest.approx(0.5) and s["ci95"][0] < 0.5 < s["ci95"][1] and s["n"] == 4
    assert mean_interval([])["mean"] is None
    again = mean_interval([0.2, 0.4, 0.6, 0.8], seed=1)
    assert again == s and all(type(x) is float for x in s["ci95"])  # seeded: the same report twice
    assert mean_interval([0.3, 0.3, 0.3])["ci95"] == pytest.approx([0.3, 0.3])  # no spread, no interval width


def test_voc_with_the_classic_engine_resumes_and_reports(tmp_path, frames_source):
    config = VocConfig(model="classic", sources=(frames_source,), out=str(tmp_path / "voc"), frames=8)
    report = run_voc(config)
    assert report["voc"]["n"] == 4 and report["per_domain"]["toy"]["n"] == 4
    assert report["voc"]["abs_mean"] > 0.8  # a clean synthetic path; its direction is a guess
    assert report["voc"]["direction_known"] == 0.0 and report["methods"] == ["seriation"]
    assert (tmp_path / "voc" / "voc.png").stat().st_size > 1000
    lines = (tmp_path / "voc" / "items.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["passes"] >= 1
    again = run_voc(config)  # resume: nothing new to score, same numbers
    assert again["voc"]["mean"] == pytest.approx(report["voc"]["mean"])
    assert len((tmp_path / "voc" / "items.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ConfigError, match="other settings"):
        run_voc(VocConfig(model="classic", sources=(frames_source,), out=str(tmp_path / "voc"), frames=6))


def test_voc_same_task_reference_anchors_the_direction(tmp_path, frames_source):
    config = VocConfig(model="classic", sources=(frames_source,), out=str(tmp_path / "voc"), frames=8,
                       reference="same-task", plots=False)
    report = run_voc(config)
    assert report["voc"]["n"] == 2  # the first episode of each task is the reference of the second
    assert report["voc"]["direction_known"] == 1.0 and report["methods"] == ["anchored"]
    records = [json.loads(line) for line in (tmp_path / "voc" / "items.jsonl").read_text().splitlines()]
    assert all(r["voc"] > 0.7 for r in records)  # anchored on another-coloured demonstration: right direction


@pytest.mark.parametrize("kwargs, match", [
    ({"sources": ()}, "no episode source"),
    ({"method": "anchored"}, "needs a reference"),
    ({"frames": 1}, "frames must be in 2..64"),
])
def test_voc_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VocConfig(**{"sources": ("frames:/tmp",), **kwargs}).check()


def test_label_writes_one_row_per_frame_and_resumes(tmp_path, frames_source):
    out = tmp_path / "progress.parquet"
    config = LabelConfig(sources=(frames_source,), out=str(out), model="classic")
    summary = run_label(config)
    table = pq.read_table(out).to_pylist()
    assert summary["episodes"] == 4 and summary["rows"] == len(table) == 8 + 9 + 10 + 11
    first = [r for r in table if r["episode_id"].endswith("ep0")]
    assert [r["frame"] for r in first] == list(range(8))
    # frames come in time order, so the classic engine's guessed direction is right and progress rises
    assert first[0]["progress"] < 0.2 and first[-1]["progress"] > 0.8
    assert all(0 <= r["progress"] <= 1 and 0 <= r["confidence"] <= 1 for r in table)
    journal = config.work_dir() / "episodes.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # a kill mid-write: 2 episodes + a torn line
    again = run_label(config)
    assert again["resumed_episodes"] == 2 and again["new_episodes"] == 2 and again["rows"] == summary["rows"]


def test_label_lerobot_rows_join_on_frame_index(tmp_path):
    eps = [{"color": c, "frames": 20, "task": "stack the cups"} for c in palette(2, seed=5)]
    write_lerobot(tmp_path / "ds", "v3.0", eps, {"observation.images.cam": "image"})
    out = tmp_path / "p.parquet"
    run_label(LabelConfig(sources=(f"lerobot:{tmp_path / 'ds'},frames=5",), out=str(out), model="classic"))
    rows = [r for r in pq.read_table(out).to_pylist() if r["episode_index"] == 1]
    assert [r["frame_index"] for r in rows] == [0, 5, 10, 14, 19]
    assert rows[-1]["timestamp"] == pytest.approx(1.9) and rows[0]["source"] == "lerobot"


def test_label_refuses_concurrency_without_a_server():
    with pytest.raises(ConfigError, match="--engine openai"):
        LabelConfig(sources=("frames:/tmp",), concurrency=4).check()


def test_label_with_the_oracle_model_object(tmp_path):
    folder = tmp_path / "eps" / "one"
    folder.mkdir(parents=True)
    for k, step in enumerate([0, 2, 4, 6, 8]):
        oracle_frame(step).save(folder / f"frame_{k}.png")
    out = tmp_path / "o.parquet"
    run_label(LabelConfig(sources=(f"frames:{tmp_path / 'eps'}",), out=str(out)),
              model=TPRU(engine=PixelOracle(), budget=None))
    values = [r["progress"] for r in pq.read_table(out).to_pylist()]
    # the oracle gives the right order ~70% of each window's mass: expected ranks rise, pulled towards 0.5
    assert values == sorted(values) and len(set(values)) == 5 and values[2] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- the CLI
def test_cli_progress_json_and_plot(tmp_path, frames_source):
    folder = frames_source.split(":", 1)[1] + "/ep2"
    plot = tmp_path / "p.png"
    result = CliRunner().invoke(cli, ["progress", folder, "-m", "classic", "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["values"]) == len(data["frames"]) == 10 and data["direction_known"] is False
    assert plot.stat().st_size > 1000


def test_cli_progress_table_says_direction_is_a_guess(frames_source):
    folder = frames_source.split(":", 1)[1] + "/ep1"
    result = CliRunner().invoke(cli, ["progress", folder, "-m", "classic"])
    assert result.exit_code == 0 and "direction is a guess" in result.output and "implied order" in result.output


def test_cli_eval_voc_and_label(tmp_path, frames_source):
    runner = CliRunner()
    voc = runner.invoke(cli, ["eval", "voc", "-m", "classic", "-s", frames_source, "-o", str(tmp_path / "v"),
                              "--frames", "6", "--no-plots"])
    assert voc.exit_code == 0, voc.output
    assert "domain toy" in voc.output and json.loads((tmp_path / "v" / "report.json").read_text())["voc"]["n"] == 4
    label = runner.invoke(cli, ["label", "-s", frames_source, "-o", str(tmp_path / "l.parquet"), "-m", "classic"])
    assert label.exit_code == 0, label.output
    assert pq.read_table(tmp_path / "l.parquet").num_rows == 38


def test_cli_label_error_is_one_red_line(tmp_path, frames_source):
    result = CliRunner().invoke(cli, ["label", "-s", frames_source, "-o", str(tmp_path / "x.csv"), "-m", "classic"])
    assert result.exit_code == 1 and "must be a .parquet file" in result.output
    assert "Traceback" not in result.output


def test_tiny_hf_model_labels(tmp_path, tiny_checkpoint, frames_source):
    out = tmp_path / "t.parquet"
    with TPRU(tiny_checkpoint) as model:
        summary = run_label(LabelConfig(sources=(frames_source + ",max_frames=5",), out=str(out)), model=model)
    assert summary["engine"] == "hf" and summary["rows"] == 20
    assert all(r["direction_known"] for r in pq.read_table(out).to_pylist())
