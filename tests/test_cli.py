"""The ``tpru`` command through click's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import synthetic_frames
from PIL import Image

from tpru_agent.cli.main import cli


@pytest.fixture(scope="module")
def frame_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("frames")
    for name, image in zip(["c.png", "a.png", "d.png", "b.png"], synthetic_frames(4)):
        image.save(folder / name)
    return folder


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def test_order_json_on_the_tiny_checkpoint(tiny_checkpoint, frame_dir, tmp_path):
    sheet = tmp_path / "sheet.png"
    result = run("order", frame_dir, "--model", tiny_checkpoint, "--mode", "fast", "--json", "--sheet", sheet)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sorted(data["order"]) == [0, 1, 2, 3] and data["engine"] == "hf" and data["mode"] == "fast"
    assert [Path(f).name for f in data["frames"]] == ["a.png", "b.png", "c.png", "d.png"]
    with Image.open(sheet) as im:
        assert im.width > 4 * 100


def test_order_table(tiny_checkpoint, frame_dir):
    result = run("order", frame_dir / "a.png", frame_dir / "b.png", "--model", tiny_checkpoint, "--mode", "fast")
    assert result.exit_code == 0
    assert "Temporal order" in result.stdout and "confidence" in result.stdout


def test_choice_verbs(tiny_checkpoint, frame_dir):
    f = {n: str(frame_dir / f"{n}.png") for n in "abcd"}
    nxt = run("next", "-H", f"{f['a']},{f['b']}", "-c", f["c"], "-c", f["d"], "--model", tiny_checkpoint,
              "--mode", "fast", "--json")
    assert nxt.exit_code == 0, nxt.output
    data = json.loads(nxt.stdout)
    assert set(data["options"]) == {"A", "B", "C"} and len(data["candidates"]) == 2
    prev = run("prev", "-L", f"{f['b']},{f['c']}", "-c", f["a"], "--model", tiny_checkpoint, "--mode", "fast")
    assert prev.exit_code == 0 and "Previous step" in prev.stdout
    ver = run("verify", f["c"], "-H", f["a"], "-H", f["b"], "--model", tiny_checkpoint, "--mode", "fast", "--json")
    assert ver.exit_code in (0, 3)
    assert json.loads(ver.stdout)["ok"] == (ver.exit_code == 0)


def test_bad_input_is_one_red_line(frame_dir, tmp_path):
    missing = tmp_path / "nope.png"
    result = run("order", missing, frame_dir / "a.png", "--model", "classic")
    assert result.exit_code == 1
    assert result.stderr.count("error:") == 1 and "nope.png" in result.stderr
    assert "Traceback" not in result.output


def test_unknown_model_and_strict_offline(frame_dir, tmp_path):
    result = run("order", frame_dir, "--model", "tpru-9b")
    assert result.exit_code == 1 and "Did you mean" in result.stderr
    typo = run("order", frame_dir, "--model", f"{tmp_path}/no-such-checkpoint")
    assert typo.exit_code == 1 and "no local folder" in typo.stderr
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    strict = run("order", frame_dir, "--strict", env=env)
    assert strict.exit_code == 1 and "Stephengzk/TPRU-3B" in strict.stderr


def test_default_model_falls_back_to_classic_with_a_warning(frame_dir, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = run("order", frame_dir, "--json", env=env)
    assert result.exit_code == 0, result.output
    assert "falling back" in result.stderr and "classic" in result.stderr
    assert json.loads(result.stdout)["engine"] == "classic"


def test_env_and_models():
    env = run("env", "--json")
    assert env.exit_code == 0
    facts = json.loads(env.stdout)
    assert facts["engines"]["hf"] is True and facts["devices"]["cpu"] is True
    models = run("models", "--json")
    names = [m["name"] for m in json.loads(models.stdout)["models"]]
    assert "tpru-3b" in names and "classic" in names


def test_subprocess_help_imports_no_torch_and_verbose_traceback(tmp_path):
    code = ("import sys; from tpru_agent.cli.main import cli; import tpru_agent.finetune.eval.statistics; "
            "print('torch' in sys.modules, 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    helped = subprocess.run(["tpru", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "order" in helped.stdout
    bad = subprocess.run(["tpru", "-v", "order", str(tmp_path / "x.png"), str(tmp_path / "y.png"), "--model",
                          "classic"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "Traceback" in bad.stderr and "FrameError" in bad.stderr


def test_subprocess_order_classic(frame_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["tpru", "order", str(frame_dir), "--model", "classic", "--json"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["engine"] == "classic" and sorted(data["order"]) == [0, 1, 2, 3]


def test_verify_reports_a_repeated_frame_as_no_progress(tmp_path):
    frames = synthetic_frames(2)
    paths = []
    for i, frame in enumerate(frames):
        paths.append(tmp_path / f"f{i}.png")
        frame.save(paths[-1])
    result = run("verify", "-H", f"{paths[0]},{paths[1]}", paths[1], "--model", "classic")
    assert result.exit_code == 3
    assert "no progress" in result.output and "valid next step" not in result.output
    # the model's P(ok) is shown only as what the repeat overrode, never as the verdict's own probability
    data = json.loads(run("verify", "-H", f"{paths[0]},{paths[1]}", paths[1], "--model", "classic", "--json").stdout)
    assert data["duplicate"] is True and data["ok"] is False
    line = result.stdout.splitlines()[0]
    assert "P(ok) =" not in line and f"model P(ok) {data['confidence']:.3f}, overridden" in line
    fresh = run("verify", "-H", paths[0], paths[1], "--model", "classic")
    assert "P(ok) = " in fresh.stdout and "overridden" not in fresh.stdout


@pytest.mark.parametrize("args", [
    ["order", "--mode", "bogus", "x.png"],   # bad option value
    ["order"],                               # missing argument
    ["order", "--bogus", "x.png"],           # unknown option of a verb
    ["verify", "x.png"],                     # missing required option
    ["bogus"],                               # unknown verb
    ["--bogus"],                             # unknown option of tpru itself
    ["eval", "run", "--bogus"],              # unknown option two groups down
])
def test_usage_errors_are_one_red_line_with_the_help_hint(args):
    result = CliRunner().invoke(cli, args, prog_name="tpru")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Usage:" not in result.output
    verb = " ".join(["tpru", *[a for a in args[:2] if a in ("order", "verify", "eval", "run")]])
    assert lines[0].endswith(f"Run `{verb} --help`.")


def test_verbose_usage_error_keeps_clicks_full_text():
    result = CliRunner().invoke(cli, ["-v", "order", "--mode", "bogus", "x.png"], prog_name="tpru")
    assert result.exit_code == 2
    assert "Usage: tpru order" in result.output and "Error: Invalid value for '--mode'" in result.output
    bare = CliRunner().invoke(cli, [])  # a bare group still prints its help, not an error line
    assert "Commands:" in bare.output and "error:" not in bare.output


def test_classic_reason_mode_says_it_ran_fast(frame_dir):
    f = {n: str(frame_dir / f"{n}.png") for n in "abcd"}
    verbs = {"order": ["order", f["a"], f["b"], f["c"]], "next": ["next", "-H", f["a"], "-c", f"{f['b']},{f['c']}"],
             "prev": ["prev", "-L", f["c"], "-c", f"{f['a']},{f['b']}"], "verify": ["verify", f["c"], "-H", f["b"]]}
    for verb, args in verbs.items():
        asked = run(*args, "--model", "classic", "--mode", "reason", "--json")
        assert asked.exit_code in (0, 3), asked.output
        assert json.loads(asked.stdout)["mode"] == "fast", verb
        warnings = [line for line in asked.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "no reasoning mode" in warnings[0], (verb, asked.stderr)
        default = run(*args, "--model", "classic", "--json")  # reason only by default: nothing to warn about
        assert json.loads(default.stdout)["mode"] == "fast" and "warning" not in default.stderr, verb


def test_finetune_without_its_extra_is_one_line_before_any_model_lookup(monkeypatch):
    import importlib

    real = importlib.import_module

    def missing_trl(name, *args, **kwargs):
        if name == "trl":
            raise ModuleNotFoundError("No module named 'trl'", name="trl")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", missing_trl)
    result = CliRunner().invoke(cli, ["finetune", "--base", "no-such-model-anywhere", "--data", "x"])
    assert result.exit_code == 1
    assert "[finetune]" in result.output
    assert "no-such-model" not in result.output and "Traceback" not in result.output


def test_the_default_model_is_never_downloaded_by_a_plain_verb(monkeypatch, frame_dir):
    """Without --model, the default is looked up in the cache only, and its absence is one warning line."""
    from tpru_agent import hub
    from tpru_agent.errors import ModelNotFoundError

    seen = {}

    def locate(model, **kwargs):
        seen.update(kwargs, model=model)
        raise ModelNotFoundError("not in the local cache")

    monkeypatch.setattr(hub, "locate", locate)
    monkeypatch.setattr(hub, "FALLBACK_MODEL", "classic")
    result = run("order", frame_dir)
    assert result.exit_code == 0, result.output
    assert seen["model"] == "tpru-3b" and seen["local_files_only"] is True
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "tpru-3b is not downloaded" in warning[0] and "hf download" in warning[0]


def test_table_cells_are_text_not_markup(capsys):
    from tpru_agent.cli import render

    render.show_table("t", ["engine", "importable"], [["hf", "no: pip install 'tpru-agent[hf]'"]])
    assert "tpru-agent[hf]" in capsys.readouterr().out
