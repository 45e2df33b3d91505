"""Episodes per hour rendered on the CPU by the simulator sources (Meta-World expert rollouts, MiniWoB++ runs).

Times ``metaworld_episodes`` over 5 tasks x 2 episodes (16 frames of 224 px each) and ``miniwob_episodes`` over
2 tasks x 3 episodes, in this process, after one untimed warm-up episode of each (env construction, browser start).
``--quick``: 2 tasks x 1 episode each. MiniWoB++ is skipped, and said so, without its package or Chromium.

    OMP_NUM_THREADS=1 python -m benchmarks sim_render
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

METAWORLD_TASKS = ["drawer-open-v3", "button-press-v3", "pick-place-v3", "reach-v3", "door-open-v3"]
MINIWOB_TASKS = ["login-user", "enter-text"]


def _rate(make, tasks: list[str], episodes: int) -> dict:
    list(make(tasks[:1], 1, seed=99))  # warm-up: construct envs / start the browser
    start = time.perf_counter()
    got = list(make(tasks, episodes, seed=0))
    wall = time.perf_counter() - start
    return {"episodes": len(got), "s_per_episode": wall / len(got), "episodes_per_hour": len(got) / wall * 3600,
            "frames_per_episode": sum(len(e) for e in got) / len(got)}


def run(args) -> dict:
    """Meta-World and MiniWoB++ episodes per hour."""
    from tpru_agent.finetune.sources.metaworld import metaworld_episodes

    tasks, episodes = (METAWORLD_TASKS[:2], 1) if args.quick else (METAWORLD_TASKS, 2)
    out = {"metaworld": _rate(lambda t, n, seed: metaworld_episodes(t, n, frames_per_episode=16, seed=seed),
                              tasks, episodes)}
    try:
        from tpru_agent.finetune.sources.miniwob import miniwob_episodes

        gui_tasks, gui_eps = (MINIWOB_TASKS[:1], 1) if args.quick else (MINIWOB_TASKS, 3)
        out["miniwob"] = _rate(lambda t, n, seed: miniwob_episodes(t, n, seed=seed), gui_tasks, gui_eps)
    except Exception as exc:  # missing package or browser: report, do not fail the Meta-World half
        out["miniwob_skipped"] = f"{type(exc).__name__}: {exc}"
    return out
