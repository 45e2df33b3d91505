"""Short runs of the loop examples on the real simulators (skipped with the reason when the sim extra is missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_example(script: str, *args: str) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--json", *args], capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1",
                                                      "MUJOCO_GL": "egl"})
    assert out.stdout, out.stderr[-3000:]
    return out.returncode, json.loads(out.stdout)


def test_robot_loop_flags_the_sabotaged_episode(tmp_path):
    pytest.importorskip("metaworld", reason="Meta-World is not installed (pip install 'tpru-agent[sim]')")
    code, result = run_example("robot_loop.py", "--task", "pick-place-v3", "--frames", "10", "--out", str(tmp_path))
    runs = result["runs"]
    assert runs["sabotaged (gripper)"]["flagged"] is True
    assert runs["correct"]["flagged"] is False
    assert code == 0
    assert len(runs["correct"]["timeline"]) == 10
    assert (tmp_path / "sabotaged" / "timeline.png").stat().st_size > 10_000
    events = (tmp_path / "correct" / "events.jsonl").read_text().splitlines()
    assert len(events) == 10


def test_gui_agent_runs_a_real_browser_episode(tmp_path):
    pytest.importorskip("miniwob", reason="MiniWoB++ is not installed (pip install 'tpru-agent[sim]')")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    code, result = run_example("gui_agent.py", "--task", "login-user", "--out", str(tmp_path))
    runs = result["runs"]
    assert set(runs) == {"correct", "wrong action"}
    assert len(runs["correct"]["timeline"]) >= 4
    assert runs["correct"]["flagged"] is False
    # The classic engine sees only visual continuity: a wrong value typed into a field looks like a right one, so
    # it does not flag the wrong run (the exit code says so); the tuned model reads the task text.
    assert code == (0 if runs["wrong action"]["flagged"] else 1)
    assert (tmp_path / "wrong" / "timeline.png").is_file()
