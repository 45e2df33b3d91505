"""ProcedureChecker.observe with the hf engine's prefix cache vs without it (window 4), per prompt layout.

Two engines load the same checkpoint, one with the prefix cache (default 512 MiB) and one with
``prefix_cache_mb=0``; every frame of a synthetic episode is observed by a checker on each, alternately, so both
sides see the same machine load. Only frames after the window is full are timed. Ratios read
``uncached_ms / cached_ms`` (mean latency of ``observe``); ``reused_pct`` is the share of prompt tokens the cached
engine took from the cache.

Scenarios (window 4, reference given, so its last frame is the goal; fast mode):
- ``checker_accept``: the checker as it is, every frame accepted (threshold ~0): the window slides at every call,
  so the prompt changes from the first history frame on; the cache saves the text before it and the vision
  encoder of every frame already seen (each frame is encoded once, as an observation, then reused as history).
- ``checker_hold``: the window is full, then every frame is judged off-procedure (threshold ~1): the history
  stays and only the observation and the text after it run.
- ``rules_first_*``: the same checker with the answer rules rendered *before* the question (a ``template=``
  file, no code change): the long rules text no longer follows the observation, so it is never run again.
- ``proposed_*``: a checker layout simulated at the engine (``score``) level: rules first, the goal frame first,
  then an append-only history ("Step 1: <image> ...", with no text that depends on its length), restarted from the
  last 2 accepted frames when it exceeds the window, then the observation. Each call then runs one new history
  frame, the observation and ~20 tokens. This needs changes in tasks/next_frame.py and checker.py (see the
  report); the figures show what they would buy.

Run:
    OMP_NUM_THREADS=1 python -m benchmarks cache --size mid
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

WINDOW = 4
KEEP = 2  # accepted frames the proposed layout restarts its history from
DESCRIPTION = "moving the square to the right"


def rules_first_template(folder: Path) -> Path:
    """The default preamble with the question moved after the answer rules (same words), as a template file."""
    from tpru_agent.tasks.prompt import DEFAULT_PREAMBLE

    marker = "{{ content | trim }}"
    head, tail = DEFAULT_PREAMBLE.split(marker)
    path = folder / "rules-first.jinja"
    path.write_text(head.strip() + "\n" + tail.strip() + "\n\n" + marker + "\n", encoding="utf-8")
    return path


def proposed_request(template: Path, history: list, goal, observation):
    """Goal first, then the history as an append-only list, then the observation as option A."""
    from tpru_agent.engines.base import Request
    from tpru_agent.tasks import next_frame, render_prompt
    from tpru_agent.tasks.question import IMAGE, describe

    steps = "\n".join(f"Step {i + 1}: {IMAGE}" for i in range(len(history)))
    problem = (f"{describe(DESCRIPTION)} The final state of the procedure looks like this:\nGoal: {IMAGE}\n"
               f"The steps observed so far, in order:\n{steps}\nWhich option shows the next step?\n"
               f"A. {IMAGE}\nB. None of the choices provided")
    question = next_frame.build(len(history), 1, with_goal=True, description=DESCRIPTION)  # options A / B
    return Request(question, render_prompt(problem, template), (goal, *history, observation))


class _Times(list):
    """Latencies in ms, plus ``tokens``: [prompt tokens taken from the cache, prompt tokens run]."""

    def __init__(self):
        super().__init__()
        self.tokens = [0, 0]


class _Timer:
    """Appends the block's milliseconds to ``times`` and adds its prompt tokens to ``times.tokens``."""

    def __init__(self, engine, times: _Times, *, timed: bool):
        self.engine, self.times, self.timed = engine, times, timed

    def __enter__(self):
        self.before = self.engine.cache_info()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        elapsed = (time.perf_counter() - self.t0) * 1000
        if self.timed and exc[0] is None:
            after = self.engine.cache_info()
            self.times.append(elapsed)
            self.times.tokens[0] += after["reused_tokens"] - self.before["reused_tokens"]
            self.times.tokens[1] += after["computed_tokens"] - self.before["computed_tokens"]


def _checker_pair(engines: dict, template, reference, accept: bool, frames: list) -> dict:
    """Observe ``frames`` with a checker on each engine, alternately; latencies after the window fills."""
    from tpru_agent import TPRU, ProcedureChecker

    checkers = {k: ProcedureChecker(TPRU(engine=e, template=template), reference=reference, description=DESCRIPTION,
                                    window=WINDOW, threshold=1e-6, confirm=2) for k, e in engines.items()}
    times = {k: _Times() for k in engines}
    for i, frame in enumerate(frames):
        if i == WINDOW and not accept:
            for checker in checkers.values():
                checker.threshold = 1 - 1e-6  # from here on every frame is judged off-procedure
        for key, checker in checkers.items():
            with _Timer(engines[key], times[key], timed=i > WINDOW):
                event = checker.observe(frame)
            if event.duplicate:
                raise RuntimeError(f"frame {i} was taken for a duplicate: the synthetic episode needs more change")
    return times


def _proposed_pair(engines: dict, template: Path, goal, accept: bool, frames: list) -> dict:
    """The proposed layout's calls (what observe would send), alternately on each engine."""
    from tpru_agent.tasks import continuation

    conts = [continuation("A"), continuation("B")]
    accepted, anchor = [frames[0]], 0
    times = {k: _Times() for k in engines}
    for i, frame in enumerate(frames[1:], start=1):
        request = proposed_request(template, accepted[anchor:], goal, frame)
        for key, engine in engines.items():
            with _Timer(engine, times[key], timed=i > WINDOW):
                engine.score(request, conts)
        if accept or i < WINDOW:
            accepted.append(frame)
            if len(accepted) - anchor > WINDOW:
                anchor = len(accepted) - KEEP
    return times


def run(args) -> dict:
    """Six scenarios (3 layouts x accept / hold), cached vs uncached engine, side by side."""
    import torch

    from benchmarks import model_folder, resolve_device, synthetic_frames, workdir
    from tpru_agent.engines.hf import HFEngine

    device = resolve_device(args.device)
    folder = model_folder(args.size, args, device=device)
    measured = 3 if args.quick else max(6, min(args.repeats, 12))
    frames = synthetic_frames(WINDOW + 1 + measured)
    reference = synthetic_frames(6, size=(168, 196))
    template = rules_first_template(workdir(args))
    engines = {"cached": HFEngine(folder, device=device),
               "uncached": HFEngine(folder, device=device, prefix_cache_mb=0)}
    figures: dict = {"window": WINDOW, "measured_frames": measured, "threads": torch.get_num_threads()}
    try:
        for warm in range(args.warmup):  # load kernels and allocator before anything is timed
            _checker_pair(engines, None, reference, True, frames[:WINDOW + 2])
        scenarios = {
            "checker_accept": lambda: _checker_pair(engines, None, reference, True, frames),
            "checker_hold": lambda: _checker_pair(engines, None, reference, False, frames),
            "rules_first_accept": lambda: _checker_pair(engines, template, reference, True, frames),
            "rules_first_hold": lambda: _checker_pair(engines, template, reference, False, frames),
            "proposed_accept": lambda: _proposed_pair(engines, template, reference[-1], True, frames),
            "proposed_hold": lambda: _proposed_pair(engines, template, reference[-1], False, frames),
        }
        for name, scenario in scenarios.items():
            engines["cached"].clear_cache()
            times = scenario()
            reused, run_ = times["cached"].tokens
            cached_ms, uncached_ms = statistics.mean(times["cached"]), statistics.mean(times["uncached"])
            figures[name] = {"cached_ms": round(cached_ms, 1), "uncached_ms": round(uncached_ms, 1),
                             "cached_vs_uncached_x": round(uncached_ms / cached_ms, 2),
                             "reused_pct": round(100 * reused / max(reused + run_, 1), 1),
                             "tokens_run_per_call": round(run_ / len(times["cached"]))}
        figures["cache_mib_used"] = round(engines["cached"].cache_info()["bytes"] / 2**20, 1)
        figures["goal_3x_met_by_checker"] = figures["checker_accept"]["cached_vs_uncached_x"] >= 3
    finally:
        for engine in engines.values():
            engine.close()
    return figures


if __name__ == "__main__":  # pragma: no cover - convenience: the suite's runner is the usual entry point
    import sys

    from benchmarks.__main__ import main

    sys.exit(main(["cache", *sys.argv[1:]]))
