"""A GUI agent checked step by step: MiniWoB++ pages in headless Chromium, a scripted agent and a wrong action.

A scripted agent solves a multi-step MiniWoB++ task (e.g. login-user: click the username field, type, click the
password field, type, submit); each step's screenshot goes to a ProcedureChecker built from a reference run of the
same task. A second run takes one wrong action; the checker must flag it, and must not flag the correct run.

Runs with the no-weights classic engine here (``--model classic``, the default) and with any model on a GPU:

    python examples/gui_agent.py --task login-user --out runs/gui
    python examples/gui_agent.py --model tpru-3b --mode fast

Needs the ``sim`` extra and Debian's ``chromium chromium-driver`` (never a downloaded browser).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from examples_common import one_line_errors, report_runs, run_checker


def episodes(task: str):
    """Reference, correct and wrong-action episodes of one MiniWoB++ task."""
    from tpru_agent.finetune.sources.miniwob import miniwob_episodes

    reference = next(miniwob_episodes([task], 1, seed=0))
    good = next(miniwob_episodes([task], 1, seed=1))
    bad = next(miniwob_episodes([task], 1, seed=1, wrong_action=True))
    return reference, good, bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="login-user", help="login-user, enter-text, click-checkboxes, ...")
    parser.add_argument("--model", default="classic", help="classic (no weights), tpru-3b, a folder ...")
    parser.add_argument("--mode", default="fast", choices=["fast", "reason"])
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--out", default="runs/gui_agent", help="folder for the timeline pictures and logs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    from tpru_agent import TPRU

    reference, good, bad = episodes(args.task)
    model = TPRU(args.model)
    out = Path(args.out)
    runs = {
        "correct": run_checker(model, reference, good.frames, mode=args.mode, window=args.window, out=out / "correct"),
        "wrong action": run_checker(model, reference, bad.frames, mode=args.mode, window=args.window,
                                    out=out / "wrong"),
    }
    result = report_runs(runs, title=f"MiniWoB++ {args.task}: {reference.description}", as_json=args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if result["runs"]["wrong action"]["flagged"] and not result["runs"]["correct"]["flagged"] else 1


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
