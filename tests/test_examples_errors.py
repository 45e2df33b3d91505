"""The examples end in one red line, not a traceback, when a system dependency is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gui_agent_without_chromium_prints_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "OMP_NUM_THREADS": "1"}   # no chromium, no chromedriver on PATH
    env.pop("MINIWOB_CHROME_BINARY", None)
    env.pop("MINIWOB_CHROMEDRIVER", None)
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "gui_agent.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and out.stderr.count("error:") == 1, out.stderr
    assert "chromium" in out.stderr.lower() or "tpru-agent[sim]" in out.stderr
