"""Accuracy of the no-weights classic engine on real episodes, against chance.

Questions follow TPRU's forms, built from Meta-World expert episodes (and optionally MiniWoB GUI episodes):
- ordering: 4 frames, one drawn at random from each quarter of the episode, shuffled; scored exact and up to
  direction (the answer or its reverse). Chance: 1/24 exact, 2/24 up to direction.
- next: steps 1, 2 and 4 given, which candidate is step 3? previous: steps 2, 3, 4 given, which is step 1?
  4 candidate frames + "None of the choices provided" at a random position. Distractors: 2 other frames of the
  same episode (not one of the 4 steps, not adjacent to the answer; for short GUI episodes, frames of other
  episodes of the same task fill in) and 1 frame of another episode of the same domain; in a share
  ``--none-share`` of questions the true frame is replaced by one more such distractor and the answer is
  "None". Chance: 1/5.

The engine answers in fast mode (argmax of ``score``); ``confidence`` is the mean probability of its answer.

Run (2 shared cores: ~2 s per Meta-World episode and ~1 s per MiniWoB episode to render, ~5 ms per question):
    OMP_NUM_THREADS=1 python benchmarks/classic_accuracy.py --tasks 50 --episodes 2 --miniwob 4 --cache /tmp/eps
    OMP_NUM_THREADS=1 python benchmarks/classic_accuracy.py --tasks 50 --episodes 2 --calibrate --seed 100
"""

from __future__ import annotations

import argparse
import math
import pickle
import random
import sys
import time
from pathlib import Path

import numpy as np

from tpru_agent.engines.base import Request
from tpru_agent.engines.classic import ClassicConfig, ClassicEngine
from tpru_agent.tasks import continuation, next_frame, ordering, previous, render_prompt


def _cached(cache_dir: str | None, name: str, make) -> list:
    path = Path(cache_dir) / name if cache_dir else None
    if path and path.exists():
        return pickle.loads(path.read_bytes())
    eps = make()
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(eps))
    return eps


def load_episodes(args) -> list:
    """Rendered episodes as (episode_id, domain, task, frames) tuples, cached under ``--cache DIR`` when given."""
    def robot():
        from tpru_agent.finetune.sources.metaworld import TASK_SENTENCES, metaworld_episodes

        tasks = sorted(TASK_SENTENCES)[: args.tasks]
        return [(e.episode_id, e.domain, e.task, e.frames)
                for e in metaworld_episodes(tasks, args.episodes, frames_per_episode=16, seed=args.seed)]

    def gui():
        from tpru_agent.finetune.sources.miniwob import AGENTS, miniwob_episodes

        return [(e.episode_id, e.domain, e.task, e.frames)
                for e in miniwob_episodes(list(AGENTS), args.miniwob, seed=args.seed)]

    eps = _cached(args.cache, f"metaworld-{args.tasks}x{args.episodes}-seed{args.seed}.pkl", robot)
    if args.miniwob:
        eps += _cached(args.cache, f"miniwob-{args.miniwob}-seed{args.seed}.pkl", gui)
    return eps


def spread4(n: int, rng: random.Random) -> list[int]:
    """One frame index from each quarter of an ``n``-frame episode (``n >= 4``), sorted."""
    edges = [round(i * n / 4) for i in range(5)]
    return [rng.randrange(edges[i], max(edges[i + 1], edges[i] + 1)) for i in range(4)]


def make_questions(episodes: list, rng: random.Random, none_share: float) -> list[tuple]:
    """(kind, domain, question, images, answer, reverse_answer) tuples: one of each kind per episode."""
    out = []
    by_domain: dict[str, list] = {}
    for ep in episodes:
        by_domain.setdefault(ep[1], []).append(ep)
    for ep_id, domain, task, frames in episodes:
        if len(frames) < 4:
            continue
        steps = spread4(len(frames), rng)
        # ordering
        perm = list(range(4))
        rng.shuffle(perm)                      # perm[k] = which step is shown as image k
        images = [frames[steps[p]] for p in perm]
        labels = "ABCD"
        answer = "".join(labels[perm.index(k)] for k in range(4))
        out.append(("ordering", domain, ordering.build(4), images, answer, answer[::-1]))
        others = [e for e in by_domain[domain] if e[0] != ep_id]
        same_task = [e for e in others if e[2] == task] or others or [(ep_id, domain, task, frames)]
        for kind, ctx_steps, target in (("next", (0, 1, 3), 2), ("previous", (1, 2, 3), 0)):
            true_idx = steps[target]
            pool = [frames[i] for i in range(len(frames)) if i not in steps and abs(i - true_idx) > 1]
            rng.shuffle(pool)
            while len(pool) < 3:  # short episodes (GUI): frames of other episodes of the same task
                donor = rng.choice(same_task)[3]
                pool.append(donor[rng.randrange(len(donor))])
            same = pool[:3]
            other_ep = rng.choice(others)[3] if others else frames
            foreign = other_ep[rng.randrange(len(other_ep))]
            is_none = rng.random() < none_share
            cands = [same[0], same[1], foreign, same[2] if is_none else frames[true_idx]]
            order = list(range(4))
            rng.shuffle(order)
            cands = [cands[i] for i in order]
            none_pos = rng.randrange(5)
            build = next_frame.build(2, 4, with_goal=True, none_position=none_pos) if kind == "next" else \
                previous.build(3, 4, none_position=none_pos)
            if is_none:
                letter = build.none_letter
            else:
                letter = next(o.letter for o in build.options if o.value == order.index(3))
            ctx = [frames[steps[s]] for s in ctx_steps]
            out.append((kind, domain, build, ctx + cands, letter, None))
    return out


def evaluate(engine: ClassicEngine, questions: list) -> dict:
    """Per (kind, domain): accuracy, up-to-direction accuracy (ordering), mean confidence, and the NLL."""
    rows: dict[tuple, dict] = {}
    for kind, domain, q, images, answer, reverse in questions:
        request = Request(q, render_prompt(q.problem), tuple(images))
        answers = q.answers()
        scores = engine.score(request, [continuation(a) for a in answers])
        best = answers[int(np.argmax(scores))]
        prob = dict(zip(answers, (math.exp(s) for s in scores)))
        r = rows.setdefault((kind, domain), {"n": 0, "exact": 0, "undirected": 0, "conf": 0.0, "nll": 0.0,
                                             "none_q": 0, "none_a": 0})
        r["n"] += 1
        r["exact"] += best == answer
        r["undirected"] += best in (answer, reverse)
        r["conf"] += prob[best]
        r["nll"] += -math.log(max(prob[answer] + (prob[reverse] if reverse else 0.0), 1e-12))
        r["none_q"] += q.none_letter is not None and answer == q.none_letter
        r["none_a"] += q.none_letter is not None and best == q.none_letter
    return rows


CHANCE = {"ordering": (1 / 24, 2 / 24), "next": (1 / 5, None), "previous": (1 / 5, None)}


def print_table(rows: dict) -> None:
    print(f"{'task':<10} {'domain':<7} {'n':>4} {'acc':>7} {'chance':>7} {'up-to-dir':>9} {'chance':>7} "
          f"{'mean conf':>9} {'None asked/answered':>20}")
    for (kind, domain), r in sorted(rows.items()):
        n = r["n"]
        c_exact, c_dir = CHANCE[kind]
        undirected = f"{100 * r['undirected'] / n:8.1f}%" if kind == "ordering" else f"{'-':>9}"
        c_dir_s = f"{100 * c_dir:6.1f}%" if c_dir else f"{'-':>7}"
        none = f"{r['none_q']}/{r['none_a']}" if kind != "ordering" else "-"
        print(f"{kind:<10} {domain:<7} {n:>4} {100 * r['exact'] / n:6.1f}% {100 * c_exact:6.1f}% {undirected} "
              f"{c_dir_s} {r['conf'] / n:9.2f} {none:>20}")


#: What ``--calibrate`` searches, one parameter at a time from the current defaults (coordinate search).
GRID = {
    "order_temperature": (0.1, 0.15, 0.2, 0.3, 0.5),
    "order_weight": (0.0, 0.5, 1.0, 2.0),
    "none_cost": (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0),
    "choice_temperature": (0.5, 1.0, 1.5, 2.0, 3.0),
    "duplicate_steps": (0.25, 0.5, 0.75, 1.0, 1.5),
    "duplicate_cost": (0.0, 1.0, 2.0, 3.0),
}


def calibrate(questions: list) -> dict:
    """Coordinate search over :data:`GRID`: best accuracy, then lowest NLL (use a seed the benchmark does not).

    ``order_temperature`` is fitted on the ordering questions by NLL alone (it cannot change their argmax).
    """
    best = dict(ClassicConfig().__dict__)
    for name, values in GRID.items():
        subset = [q for q in questions if (q[0] == "ordering") == (name == "order_temperature")]
        trials = []
        for value in values:
            rows = evaluate(ClassicEngine(ClassicConfig(**{**best, name: value})), subset)
            acc = sum(r["exact"] for r in rows.values()) / sum(r["n"] for r in rows.values())
            trials.append((-acc, sum(r["nll"] for r in rows.values()), value))
        neg_acc, nll, best[name] = min(trials)
        print(f"{name:<20} -> {best[name]:<6} (accuracy {-neg_acc:.3f}, NLL {nll:.1f}; tried {values})")
    return best


def measure(*, tasks: int, episodes: int, miniwob: int, seed: int = 0, repeats: int = 3, none_share: float = 0.2,
            cache: str | None = None) -> tuple[dict, dict]:
    """Render (or load) episodes, ask the questions; return the per-(task, domain) rows and run facts."""
    args = argparse.Namespace(tasks=tasks, episodes=episodes, miniwob=miniwob, seed=seed, cache=cache)
    t0 = time.perf_counter()
    episodes_ = load_episodes(args)
    render_s = time.perf_counter() - t0
    rng = random.Random(seed)
    questions = [q for _ in range(repeats) for q in make_questions(episodes_, rng, none_share)]
    t0 = time.perf_counter()
    rows = evaluate(ClassicEngine(), questions)
    score_ms = 1000 * (time.perf_counter() - t0) / max(len(questions), 1)
    return rows, {"episodes": len(episodes_), "questions": len(questions), "render_s": render_s,
                  "score_ms_per_question": score_ms}


def run(args) -> dict:
    """Benchmark-runner entry (``python -m benchmarks classic_accuracy``): accuracy and chance per task/domain.

    ``--quick``: 5 Meta-World tasks x 1 episode, no MiniWoB. Otherwise 50 tasks x 2 episodes and 4 episodes per
    MiniWoB task (MiniWoB is left out, and said so, when its package or Chromium is missing).
    """
    import importlib.util

    import benchmarks
    from tpru_agent.errors import EngineUnavailableError

    cache = str(benchmarks.workdir(args) / "classic_accuracy")   # rendered episodes, reused by later runs
    miniwob = 0 if args.quick or importlib.util.find_spec("miniwob") is None else 4
    try:
        rows, facts = measure(tasks=5 if args.quick else 50, episodes=1 if args.quick else 2, miniwob=miniwob,
                              cache=cache)
    except EngineUnavailableError as exc:
        if "Chromium" not in str(exc):
            raise
        rows, facts = measure(tasks=5 if args.quick else 50, episodes=1 if args.quick else 2, miniwob=0, cache=cache)
        facts["miniwob_skipped"] = str(exc)
    out: dict = dict(facts)
    for (kind, domain), r in sorted(rows.items()):
        key = f"{kind}.{domain}"
        out[f"{key}.n"] = r["n"]
        out[f"{key}.acc_pct"] = round(100 * r["exact"] / r["n"], 1)
        out[f"{key}.chance_pct"] = round(100 * CHANCE[kind][0], 1)
        if kind == "ordering":
            out[f"{key}.up_to_direction_pct"] = round(100 * r["undirected"] / r["n"], 1)
            out[f"{key}.up_to_direction_chance_pct"] = round(100 * CHANCE[kind][1], 1)
        out[f"{key}.mean_confidence"] = round(r["conf"] / r["n"], 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=50, help="first N Meta-World tasks (sorted by name)")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per task")
    parser.add_argument("--miniwob", type=int, default=0, help="episodes per MiniWoB task (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="episode seed (calibration used 100)")
    parser.add_argument("--repeats", type=int, default=3, help="question draws per episode")
    parser.add_argument("--none-share", type=float, default=0.2)
    parser.add_argument("--cache", help="folder to keep rendered episodes between runs")
    parser.add_argument("--calibrate", action="store_true")
    args = parser.parse_args(argv)
    if args.calibrate:
        episodes = load_episodes(args)
        rng = random.Random(args.seed)
        calibrate([q for _ in range(args.repeats) for q in make_questions(episodes, rng, args.none_share)])
        return 0
    rows, facts = measure(tasks=args.tasks, episodes=args.episodes, miniwob=args.miniwob, seed=args.seed,
                          repeats=args.repeats, none_share=args.none_share, cache=args.cache)
    print(f"{facts['episodes']} episodes (rendered in {facts['render_s']:.0f} s), {facts['questions']} questions, "
          f"seed {args.seed}, {ClassicConfig()}")
    print_table(rows)
    print(f"scoring: {facts['score_ms_per_question']:.1f} ms per question")
    return 0


if __name__ == "__main__":
    sys.exit(main())
