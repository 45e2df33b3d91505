"""The sampling plan of a build: which frames, questions and answers become rows, decided from thumbnails alone.

Deterministic for a seed and the cached episodes: every random choice comes from an RNG seeded with the build seed
and the episode id (or the split), and categories (task, question form, negative kind, answer letter, "None"
position) are drawn by quota (largest deficit first), so their shares match the configured ones exactly.

Steps: drop exact duplicate episodes and too-short ones -> group near-duplicate episodes -> split by group (held-out
tasks go to test) -> for each episode, draw windows of 4 frames spread over it (pairwise distinct) and build
questions with hard distractors (see :func:`Planner.distractors`).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from tpru_agent.errors import ConfigError, close_matches
from tpru_agent.finetune.data.episode_cache import EpisodeRecord
from tpru_agent.finetune.data.features import THUMB_SIDE
from tpru_agent.finetune.sources.common import even_indices

WINDOW = 4            # TPRU sequences have 4 steps
N_CANDIDATES = 4      # candidate frames per next / previous question (plus the "None" option)
CHOICE_LETTERS = "ABCDE"
WINDOW_TRIES = 8
SHORTLIST = 3         # distractors are drawn among the SHORTLIST x needed closest valid frames


@dataclass(frozen=True)
class SampleSpec:
    """One planned row: the rendered question text, its answer and references to cached frames."""

    split: str
    task: str
    domain: str
    episode_id: str
    negative: str                           # "" | "swap" (description swapped) | "missing" (true answer removed)
    problem: str
    answer: str
    images: tuple[tuple[int, int], ...]     # (episode gid, frame index) in placeholder order
    none_letter: str | None = None


def _rng(*parts) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big"))


class Quota:
    """Draw categories so that counts follow target shares exactly: the largest deficit wins, ties by RNG."""

    def __init__(self, shares: dict[str, float], rng: random.Random):
        total = sum(shares.values())
        self.shares = {k: v / total for k, v in shares.items() if v > 0} if total > 0 else {}
        self.counts = {k: 0 for k in self.shares}
        self.n = 0
        self.rng = rng

    def pick(self, exclude: str | None = None) -> str:
        """A category (never ``exclude``)."""
        self.n += 1
        options = [k for k in self.shares if k != exclude]
        deficit = {k: self.shares[k] * self.n - self.counts[k] for k in options}
        top = max(deficit.values())
        chosen = self.rng.choice(sorted(k for k in options if deficit[k] >= top - 1e-9))
        self.counts[chosen] += 1
        return chosen

    def undo(self, category: str) -> None:
        """Forget a draw whose sample could not be made."""
        self.n -= 1
        self.counts[category] -= 1


def _distinct(thumbs: np.ndarray, threshold: int) -> bool:
    t = thumbs.astype(np.int16)
    return all(np.abs(t[a] - t[b]).max() > threshold for a, b in itertools.combinations(range(len(t)), 2))


def near_duplicate_groups(records: list[EpisodeRecord], threshold: int) -> list[int]:
    """Group id per record: episodes whose 4 evenly spaced frames are pairwise near-duplicates share a group.

    Compared within each domain (all pairs: quadratic, a few seconds for thousands of episodes per domain), first on
    8x8 block means of the gray thumbnails (a necessary condition), then on the full thumbnails.
    """
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_domain[rec.domain].append(i)
    for members in by_domain.values():
        if len(members) < 2:
            continue
        full = np.stack([records[i].thumbs[even_indices(len(records[i]), WINDOW)] for i in members]).astype(np.int16)
        gray = full[:, :, : THUMB_SIDE * THUMB_SIDE].reshape(len(members), WINDOW, 8, 4, 8, 4)
        coarse = gray.mean(axis=(3, 5), dtype=np.float32).reshape(len(members), -1)   # |mean diff| <= max diff
        rows = max(1, 4_000_000 // coarse.size)                                        # ~16 MB per block
        for start in range(0, len(members), rows):
            close = np.abs(coarse[start:start + rows, None, :] - coarse[None, :, :]).max(axis=-1) <= threshold
            for a, b in zip(*np.nonzero(close)):
                i, j = start + int(a), int(b)
                if j > i and np.abs(full[i] - full[j]).max() <= threshold:
                    parent[find(members[j])] = find(members[i])
    return [find(i) for i in range(len(records))]


class Planner:
    """Turns episode records into :class:`SampleSpec` rows for a :class:`~.build.BuildConfig`."""

    def __init__(self, records: list[EpisodeRecord], config):
        self.config = config
        self.records = {r.gid: r for r in records}
        self.skips: list[list[str]] = []
        self.stats: dict[str, int] = defaultdict(int)
        self.split_of: dict[int, str] = {}
        self.neighbours: dict[int, list[int]] = {}
        self._seen: set[str] = set()

    # ------------------------------------------------------------------ episodes -> groups -> splits
    def _usable(self) -> list[EpisodeRecord]:
        seen: dict[tuple, str] = {}
        out = []
        for rec in sorted(self.records.values(), key=lambda r: r.gid):
            if len(rec) < WINDOW:
                self.skips.append([rec.episode_id, f"too short: {len(rec)} frames, need {WINDOW}"])
            elif rec.digests in seen:
                self.skips.append([rec.episode_id, f"duplicate episode: same frames as {seen[rec.digests]}"])
            else:
                seen[rec.digests] = rec.episode_id
                out.append(rec)
        return out

    def assign_splits(self, usable: list[EpisodeRecord]) -> None:
        """Fill ``split_of``: whole near-duplicate groups go to one side; held-out tasks' groups go to test."""
        cfg = self.config
        tasks = {r.task for r in usable}
        for task in cfg.holdout_tasks:
            if task not in tasks:
                raise ConfigError(f"held-out task {task!r} is not among the episodes' tasks ({len(tasks)} tasks, "
                                  f"e.g. {sorted(tasks)[:5]})." + close_matches(task, tasks))
        group_of = near_duplicate_groups(usable, cfg.near_dup)
        groups: dict[int, list[EpisodeRecord]] = defaultdict(list)
        for rec, g in zip(usable, group_of):
            groups[g].append(rec)
        self.stats["near_duplicate_groups"] = sum(len(m) > 1 for m in groups.values())
        held = [g for g, m in groups.items() if any(r.task in cfg.holdout_tasks for r in m)]
        rest = [g for g in sorted(groups) if g not in held]
        _rng(cfg.seed, "split").shuffle(rest)
        total = sum(len(groups[g]) for g in rest)
        target = round(cfg.test_fraction * total)
        if cfg.test_fraction > 0 and target == 0 and len(rest) >= 2:
            target = 1
        test, count = set(held), 0
        for g in rest:
            # a test fraction below 1 keeps at least one group to train on; 1.0 asks for a test set only
            if count >= target or (cfg.test_fraction < 1 and len(test) - len(held) >= len(rest) - 1):
                break
            test.add(g)
            count += len(groups[g])
        for g, members in groups.items():
            for rec in members:
                self.split_of[rec.gid] = "test" if g in test else "train"
        self._group = {rec.gid: g for rec, g in zip(usable, group_of)}

    def find_neighbours(self, usable: list[EpisodeRecord]) -> None:
        """For each episode, the closest episodes (mean 16x16 embedding) of the same split and domain, other task."""
        by_pool: dict[tuple[str, str], list[EpisodeRecord]] = defaultdict(list)
        for rec in usable:
            by_pool[(self.split_of[rec.gid], rec.domain)].append(rec)
        for members in by_pool.values():
            means = np.stack([r.embeds.astype(np.float32).mean(axis=0) / 255.0 for r in members])
            sq = (means ** 2).sum(axis=1)
            for start in range(0, len(members), 256):
                block = means[start:start + 256]
                dist = sq[start:start + 256, None] + sq[None, :] - 2.0 * block @ means.T
                for a in range(len(block)):
                    rec = members[start + a]
                    order = np.argsort(dist[a], kind="stable")
                    # Never the same task: the same moment of a sibling episode is a second right answer (or makes
                    # a "None" answer wrong). Episodes without a task name are compared only by their group.
                    picked = [members[int(j)].gid for j in order
                              if self._group[members[int(j)].gid] != self._group[rec.gid]
                              and not (rec.task and members[int(j)].task == rec.task)]
                    self.neighbours[rec.gid] = picked[: self.config.neighbour_episodes]

    # ------------------------------------------------------------------ frames -> questions
    def window(self, rec: EpisodeRecord, rng: random.Random) -> list[int] | None:
        """Four frame indices, one per quarter of the episode, pairwise not near-duplicates (or None)."""
        n = len(rec)
        bounds = [round(k * n / WINDOW) for k in range(WINDOW + 1)]
        for _ in range(WINDOW_TRIES):
            picked = [rng.randrange(bounds[k], bounds[k + 1]) for k in range(WINDOW)]
            if _distinct(rec.thumbs[picked], self.config.near_dup):
                return picked
        return None

    def _take(self, ranked: list, k: int, chosen: list, rng: random.Random) -> list:
        """Up to ``k`` of ``ranked`` (closest first) that are near-duplicates of nothing in ``chosen``."""
        threshold = self.config.near_dup
        taken: list = []
        shortlist = ranked[: max(SHORTLIST * k, k)]
        rng.shuffle(shortlist)
        for ref, thumb in shortlist + ranked[len(shortlist):]:
            if len(taken) == k:
                break
            if all(np.abs(thumb - other).max() > threshold for _, other in chosen + taken):
                taken.append((ref, thumb))
        return taken

    def distractors(self, rec: EpisodeRecord, answer: int, local: list[int], need: int,
                    rng: random.Random) -> list[tuple[int, int]] | None:
        """``need`` hard distractor frames for the frame ``answer`` of ``rec``.

        Up to ``in_episode_distractors`` come from ``local`` (frames of the same episode that cannot be the
        answer), the rest from the nearest neighbour episodes, closest to the answer first; none is a
        near-duplicate of the answer or of another candidate. ``None`` when not enough distinct frames exist.
        """
        target = rec.embeds[answer].astype(np.float32)
        chosen = [((rec.gid, answer), rec.thumbs[answer].astype(np.int16))]

        def ranked(pairs):
            if not pairs:
                return []
            embeds = np.stack([self.records[g].embeds[f] for g, f in pairs]).astype(np.float32)
            order = np.argsort(((embeds - target) ** 2).sum(axis=1), kind="stable")
            return [(pairs[i], self.records[pairs[i][0]].thumbs[pairs[i][1]].astype(np.int16)) for i in order]

        inside = ranked([(rec.gid, i) for i in local])
        outside = ranked([(g, f) for g in self.neighbours.get(rec.gid, []) for f in range(len(self.records[g]))])
        picked = self._take(inside, min(self.config.in_episode_distractors, need), chosen, rng)
        picked += self._take(outside, need - len(picked), chosen + picked, rng)
        if len(picked) < need:
            used = {ref for ref, _ in picked}
            picked += self._take([p for p in inside if p[0] not in used], need - len(picked), chosen + picked, rng)
        if len(picked) < need:
            return None
        return [ref for ref, _ in picked]

    def permutations(self, answer: str, count: int, rng: random.Random) -> list[str]:
        """``count`` wrong orders: one or two a single adjacent swap away from ``answer``, the rest random."""
        near = [answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:] for i in range(len(answer) - 1)]
        rng.shuffle(near)
        picked = near[: min(rng.randint(1, 2), count)]
        others = ["".join(p) for p in itertools.permutations(sorted(answer)) if "".join(p) not in picked + [answer]]
        return picked + rng.sample(others, count - len(picked))
