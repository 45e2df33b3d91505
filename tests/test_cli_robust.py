"""One red line where the README promises one: missing extras, odd file names, remote code, bad inputs first;
the real model's download command wherever weights are missing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import synthetic_frames

from tpru_agent import hub
from tpru_agent.cli.main import cli
from tpru_agent.errors import ModelNotFoundError


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("frames")
    paths = []
    for name, image in zip(["c.png", "a.png", "d.png", "b.png"], synthetic_frames(4)):
        image.save(folder / name)
        paths.append(folder / name)
    return paths


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def _tpru(args: list[str], *, env: dict | None = None, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``tpru ARGS`` in a fresh interpreter, with the modules in ``block`` made unimportable (an extra not installed)."""
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block) +
            "from tpru_agent.cli.main import main\nsys.argv = ['tpru', *sys.argv[1:]]\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_finetune_without_its_extra_names_the_extra(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("base: qwen2.5-vl-3b\n")
    out = _tpru(["finetune", "--config", str(config), "--dry-run"], block=("yaml", "trl", "peft", "datasets"))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("error:") == 1
    assert "[finetune] extra" in out.stderr and "pip install -e '.[finetune]'" in out.stderr


def test_non_ascii_and_non_utf8_names_print_under_an_ascii_terminal(frames, tmp_path):
    odd = tmp_path / "épreuve.png"
    odd.write_bytes(frames[0].read_bytes())
    raw = os.fsdecode(bytes(tmp_path) + b"/\xff.png")
    Path(raw).write_bytes(frames[1].read_bytes())
    out = _tpru(["order", str(odd), raw, str(frames[2]), "--model", "classic"], env={"PYTHONIOENCODING": "ascii"})
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "\\xe9preuve.png" in out.stdout


def test_a_remote_code_model_folder_is_one_line(frames, tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mymodel",
                                                    "auto_map": {"AutoModel": "modeling_my.MyModel"}}))
    (folder / "model.safetensors").write_bytes(b"")
    result = run("order", *frames[:3], "--model", folder)
    assert result.exit_code == 1 and result.stderr.count("error:") == 1
    assert "remote-code model" in result.stderr and "never executes code" in result.stderr


def test_inputs_are_checked_before_any_model_is_looked_up(frames, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    for args in (["order", tmp_path / "typo.png", frames[0]],
                 ["next", "-H", frames[0], "-c", tmp_path / "typo.png"],
                 ["verify", tmp_path / "typo.png", "-H", frames[0]]):
        result = run(*args, env=env)
        assert result.exit_code == 1, result.output
        assert "typo.png" in result.stderr and "warning" not in result.stderr and "falling back" not in result.stderr


def test_a_file_name_with_a_comma_passes_whole(frames, tmp_path):
    comma = tmp_path / "a,b.png"
    comma.write_bytes(frames[0].read_bytes())
    result = run("next", "-H", comma, "-H", f"{frames[1]},{frames[2]}", "-c", frames[3], "--model", "classic",
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["candidates"] == [str(frames[3])]


def test_a_comma_file_name_inside_a_comma_list_stays_whole(frames, tmp_path):
    comma = tmp_path / "left,right.png"
    comma.write_bytes(frames[0].read_bytes())
    result = run("next", "-H", f"{comma},{frames[1]}", "-c", frames[3], "--model", "classic", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["candidates"] == [str(frames[3])]   # before: "frame 0 ... 'left': no such file"


def test_models_prints_the_download_command_for_missing_weights(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    table = run("models", env={**env, "COLUMNS": "200"})
    assert "hf download Stephengzk/TPRU-3B  (~7.5 GB)" in table.stdout
    rows = {m["name"]: m for m in json.loads(run("models", "--json", env=env).stdout)["models"]}
    assert rows["tpru-3b"]["download"] == "hf download Stephengzk/TPRU-3B" and rows["classic"]["download"] is None


def test_missing_weights_message_says_hf_download_and_the_size(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError) as unset:
        hub.locate("tpru-3b", local_files_only=True)
    text = str(unset.value)
    assert "hf download Stephengzk/TPRU-3B" in text and "7.5 GB" in text and "huggingface-cli" not in text
    assert "set HF_HUB_OFFLINE=1" in text and "--engine classic" in text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as already:
        hub.locate("tpru-3b", inference=False)
    assert "set HF_HUB_OFFLINE=1" not in str(already.value) and "HF_HUB_OFFLINE is set" in str(already.value)
    assert "classic" not in str(already.value)   # training cannot use the no-weights engine


def test_the_fallback_warning_gives_the_download_command(frames, tmp_path):
    result = run("order", *frames, "--json", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "`hf download Stephengzk/TPRU-3B  (~7.5 GB)`" in result.stderr


def test_a_reason_mode_parse_error_suggests_fast_mode(tiny_checkpoint, frames):
    result = run("order", *frames[:3], "--model", tiny_checkpoint)   # random weights: no <answer> block
    assert result.exit_code == 1, result.output
    assert result.stderr.count("error:") == 1 and "--mode fast" in result.stderr


def test_lines_are_not_wrapped_in_a_pipe(frames, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4)
    deep.mkdir()
    target = deep / "observation-frame-with-a-long-name.png"
    target.write_bytes(frames[0].read_bytes())
    result = run("verify", target, "-H", frames[1], "--model", "classic")
    assert result.exit_code in (0, 3), result.output
    assert re.search(r"P\(ok\) = \d\.\d{3}", result.stdout), result.stdout
    table = run("models")
    assert all("…" not in line for line in table.stdout.splitlines())


def test_cli_messages_do_not_send_users_to_sdk_functions(frames, tmp_path):
    clip = tmp_path / "clip.mp4"
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 32))
    for k in range(8):
        writer.write(np.full((32, 32, 3), 30 * k, np.uint8))
    writer.release()
    result = run("verify", clip, "-H", frames[0], "--model", "classic")
    assert result.exit_code == 1 and "is a video, not one frame" in result.stderr
    assert "pass it to load_frames" not in result.stderr and "tpru order" in result.stderr


def test_serve_on_a_busy_port_fails_before_loading_or_announcing(tmp_path):
    pytest.importorskip("uvicorn")
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run("serve", "--model", "classic", "--port", port)
    assert result.exit_code == 1, result.output
    assert "cannot listen on 127.0.0.1:" in result.stderr and "serving" not in result.stderr
    assert "loading" not in result.stderr


def test_no_library_progress_bars_between_the_cli_lines(tiny_checkpoint, tmp_path):
    """Transformers' tqdm bars (loading weights) are noise in a one-answer CLI; ``-v`` keeps them."""
    pytest.importorskip("torch")
    paths = []
    for i, im in enumerate(synthetic_frames(4)):
        paths.append(str(tmp_path / f"f{i}.png"))
        im.save(paths[-1])
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env["OMP_NUM_THREADS"] = "1"
    quiet = subprocess.run([sys.executable, "-m", "tpru_agent.cli.main", "order", *paths, "--model",
                            str(tiny_checkpoint), "--mode", "fast"], capture_output=True, text=True, env=env,
                           timeout=300)
    loud = subprocess.run([sys.executable, "-m", "tpru_agent.cli.main", "-v", "order", *paths, "--model",
                           str(tiny_checkpoint), "--mode", "fast"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-500:] + loud.stderr[-500:]
    assert "Loading weights" not in quiet.stderr and "Loading weights" in loud.stderr
