"""A robot control loop checked frame by frame: Meta-World expert episodes and a sabotaged one.

A ProcedureChecker is built from a reference episode of the task (rendered on the CPU with the task's built-in
expert policy). It then watches a new expert episode of the same task and a sabotaged episode (the gripper opened
early, or noise on the actions) that covers the same number of simulator steps, prints a per-frame timeline and
saves a picture of each run. The sabotaged run must be flagged (a ``rejected`` verdict); the correct one must not.

Runs with the no-weights classic engine here (``--model classic``, the default) and with any model on a GPU:

    MUJOCO_GL=egl python examples/robot_loop.py --task pick-place-v3 --out runs/robot
    python examples/robot_loop.py --model tpru-3b --mode fast            # the tuned model

Needs the ``sim`` extra (``pip install 'tpru-agent[sim]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from examples_common import report_runs, run_checker  # noqa: E402


def episodes(task: str, frames: int, sabotage: str):
    """Reference, correct and sabotaged episodes of one task (the sabotaged one spans the same steps)."""
    from tpru_agent.finetune.sources.metaworld import metaworld_episodes

    reference = next(metaworld_episodes([task], 1, frames_per_episode=frames, seed=0))
    good = next(metaworld_episodes([task], 1, frames_per_episode=frames, seed=1))
    kwargs = {"open_gripper_early": True} if sabotage == "gripper" else {"perturb": 0.5}
    bad = next(metaworld_episodes([task], 1, frames_per_episode=frames, seed=1,
                                  max_steps=max(good.meta["steps"], 8), **kwargs))
    return reference, good, bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pick-place-v3", help="Meta-World v3 task name")
    parser.add_argument("--model", default="classic", help="classic (no weights), tpru-3b, a folder ...")
    parser.add_argument("--mode", default="fast", choices=["fast", "reason"])
    parser.add_argument("--frames", type=int, default=12, help="frames per episode")
    parser.add_argument("--sabotage", default="gripper", choices=["gripper", "perturb"])
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--out", default="runs/robot_loop", help="folder for the timeline pictures and logs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    from tpru_agent import TPRU

    reference, good, bad = episodes(args.task, args.frames, args.sabotage)
    model = TPRU(args.model)
    out = Path(args.out)
    runs = {
        "correct": run_checker(model, reference, good.frames, mode=args.mode, window=args.window, out=out / "correct"),
        f"sabotaged ({args.sabotage})": run_checker(model, reference, bad.frames, mode=args.mode,
                                                    window=args.window, out=out / "sabotaged"),
    }
    result = report_runs(runs, title=f"Meta-World {args.task}: {reference.description}", as_json=args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    flagged_bad = result["runs"][f"sabotaged ({args.sabotage})"]["flagged"]
    flagged_good = result["runs"]["correct"]["flagged"]
    return 0 if flagged_bad and not flagged_good else 1


if __name__ == "__main__":
    sys.exit(main())
