"""Held-out task figures for a model against the classic engine, side by side in one run (issue 10).

On Meta-World ML45 *test* tasks (never trained on), fresh expert episodes rendered here:

- ``verify_step`` separating the true next frame from a frame of another task's episode and from a step backwards
  (AUROC of P(ok), and how often ``ok`` is True, per kind);
- the README example (``examples/frames``, true order CADB);
- speed on 1 thread: ``verify_step`` latency and ``ProcedureChecker.observe`` rate.

Ordering and next-frame accuracy on held-out tasks come from ``tpru eval run`` (see the tpru-nano recipe).

Run: ``OMP_NUM_THREADS=1 python -m benchmarks heldout_tasks --model tpru-nano``
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks import percentile, pin_threads

ML45_TEST = ("bin-picking-v3", "box-close-v3", "door-lock-v3", "door-unlock-v3", "hand-insert-v3")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "frames"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tpru-nano", help="model to measure against the classic engine")
    parser.add_argument("--engine", default="auto", help="engine for --model")
    parser.add_argument("--episodes", type=int, default=4, help="held-out episodes per ML45 test task")
    parser.add_argument("--seed", type=int, default=23, help="episode seed (not used by any training build)")


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(a random positive scores above a random negative), ties counted half."""
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def _episodes(n: int, seed: int) -> list:
    from tpru_agent.finetune.sources.metaworld import metaworld_episodes

    return list(metaworld_episodes(list(ML45_TEST), n, frames_per_episode=8, size=224, seed=seed))


def verify_figures(model, episodes: list, *, trained_shape: bool = False) -> dict:
    """P(ok) for true next steps, other-episode frames and steps backwards, over every episode.

    ``trained_shape`` asks TPRU's trained next-frame shape (4 candidates + None) by adding 3 distractor frames from
    other tasks' episodes at the same point of their rollouts (``verify_step(distractors=...)``); otherwise the
    SDK's default shape (the observation alone + None).
    """
    kinds: dict[str, list[float]] = {"true_next": [], "other_episode": [], "step_back": []}
    oks: dict[str, list[bool]] = {k: [] for k in kinds}
    latency = []
    for e, ep in enumerate(episodes):
        other = episodes[(e + len(ML45_TEST)) % len(episodes)] if len(episodes) > len(ML45_TEST) else episodes[e - 1]
        if other.task == ep.task:
            other = next(o for o in episodes if o.task != ep.task)
        f, g = ep.frames, other.frames
        for i in range(0, len(f) - 2, 2):
            cases = {"true_next": ([f[i], f[i + 1]], f[i + 2]), "other_episode": ([f[i], f[i + 1]], g[i + 2]),
                     "step_back": ([f[i + 1], f[i + 2]], f[i])}
            others = [o.frames[i + 2] for o in episodes if o.task not in (ep.task, other.task)][:3]
            for kind, (history, obs) in cases.items():
                t0 = time.perf_counter()
                verdict = model.verify_step(history, obs, description=ep.description, mode="fast",
                                            distractors=others if trained_shape else None)
                latency.append(time.perf_counter() - t0)
                kinds[kind].append(verdict.confidence)
                oks[kind].append(bool(verdict.ok))
    return {
        "n_per_kind": len(kinds["true_next"]),
        "auroc_vs_other_episode": auroc(kinds["true_next"], kinds["other_episode"]),
        "auroc_vs_step_back": auroc(kinds["true_next"], kinds["step_back"]),
        "ok_rate": {k: float(np.mean(v)) for k, v in oks.items()},
        "mean_p_ok": {k: float(np.mean(v)) for k, v in kinds.items()},
        "verify_p50_ms": 1000 * percentile(latency, 50),
        "verify_p95_ms": 1000 * percentile(latency, 95),
    }


def checker_rate(model, episode) -> float:
    """ProcedureChecker.observe calls per second over one episode's frames (the first one primes the history)."""
    from tpru_agent import ProcedureChecker

    checker = ProcedureChecker(model, description=episode.description)
    checker.observe(episode.frames[0])
    t0 = time.perf_counter()
    for frame in episode.frames[1:]:
        checker.observe(frame)
    return (len(episode.frames) - 1) / (time.perf_counter() - t0)


def readme_example(model) -> dict:
    truth = json.loads((EXAMPLES / "order.json").read_text())
    frames = sorted(EXAMPLES.glob("frame_*.png"))
    label = {p.name: "ABCD"[i] for i, p in enumerate(frames)}   # labels in file-name order, as the CLI shows them
    result = model.order_frames([str(p) for p in frames], mode="fast")
    letters = "".join("ABCD"[i] for i in result.order)
    want = "".join(label[name] for name in truth["order"])
    return {"answer": letters, "truth": want, "correct": letters == want, "confidence": result.confidence}


def run(args) -> dict:
    pin_threads(1)
    from tpru_agent import TPRU

    name, engine = getattr(args, "model", None) or "tpru-nano", getattr(args, "engine", None) or "auto"
    quick = getattr(args, "quick", False)
    # Models first: importing transformers' generation code (torch._dynamo -> triton) after MuJoCo has made its EGL
    # context segfaults in triton's import (seen here with Mesa); loading the model before rendering avoids it.
    models = (("classic", TPRU("classic")), (name, TPRU(name, engine=engine)))
    episodes = _episodes(1 if quick else getattr(args, "episodes", 4), getattr(args, "seed", 23))
    out = {}
    for label, model in models:
        row = {"engine": model.engine_name, **verify_figures(model, episodes), "readme_example": readme_example(model),
               "checker_hz": checker_rate(model, episodes[0])}
        if not quick:
            row["trained_shape"] = verify_figures(model, episodes, trained_shape=True)
        out[label] = row
        model.close()
    out["episodes"] = len(episodes)
    out["tasks"] = list(ML45_TEST)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args()), indent=2))
