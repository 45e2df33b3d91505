"""Questions from planned windows: the three TPRU tasks, the ordering multiple choice, negatives, balanced letters.

Every question is rendered by the task contract (:mod:`tpru_agent.tasks`), so ``problem`` is exactly the text the
SDK sends at inference (the answer-rules preamble is added at train / inference time, not stored).

- ``ordering``: the 4 window frames shuffled, labelled A-D; answer the permutation. A share
  (``ordering_mcq_share``) is asked as ``ordering_mcq``: 4 candidate orders + "None of the choices provided".
- ``next``: steps 1, 2 and 4 given, which candidate is step 3 (TPRU's form); ``previous``: steps 2-4 given, which
  is step 1. 4 candidates + "None".
- Negatives (multiple-choice forms only; their answer is the "None" letter): ``swap`` replaces the description by
  another task's description of the same domain and split; ``missing`` leaves the true frame (or order) out of the
  candidates. When no other description exists, a ``swap`` becomes a ``missing`` (counted).
- Answer letters of the 5-option questions are drawn by quota, so each letter gets 20% (+- one question), and the
  "None" option moves through every position.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from tpru_agent.finetune.data.episode_cache import EpisodeRecord
from tpru_agent.finetune.data.plan import CHOICE_LETTERS, N_CANDIDATES, Planner, Quota, SampleSpec, _rng
from tpru_agent.tasks import next_frame, ordering, previous

CHOICE_TASKS = ("ordering_mcq", "next", "previous")


class SampleMaker:
    """Builds the :class:`SampleSpec` rows of one split, in episode order."""

    def __init__(self, planner: Planner, split: str):
        cfg = planner.config
        self.planner, self.cfg, self.split = planner, cfg, split
        rng = _rng(cfg.seed, split, "quota")
        self.tasks = Quota({"ordering": cfg.ordering_weight, "next": cfg.next_weight,
                            "previous": cfg.previous_weight}, rng)
        self.forms = Quota({"perm": 1.0 - cfg.ordering_mcq_share, "mcq": cfg.ordering_mcq_share}, rng)
        self.negatives = Quota({"": 1.0 - cfg.negative_swap_share - cfg.negative_missing_share,
                                "swap": cfg.negative_swap_share, "missing": cfg.negative_missing_share}, rng)
        self.letters = Quota({c: 1.0 for c in CHOICE_LETTERS}, rng)
        self.nones = Quota({c: 1.0 for c in CHOICE_LETTERS}, rng)
        self.descriptions: dict[str, list[tuple[str, str]]] = defaultdict(list)

    def collect_descriptions(self, records: list[EpisodeRecord]) -> None:
        """The (task, description) pairs of each domain in this split, the pool for ``swap`` negatives."""
        pools: dict[str, set] = defaultdict(set)
        for rec in records:
            if rec.description.strip():
                pools[rec.domain].add((rec.task, rec.description))
        self.descriptions = {d: sorted(p) for d, p in pools.items()}

    def _swap_text(self, rec: EpisodeRecord, rng) -> str | None:
        others = [d for t, d in self.descriptions.get(rec.domain, [])
                  if t != rec.task and d.strip().lower() != rec.description.strip().lower()]
        return rng.choice(others) if others else None

    def _keep(self, spec: SampleSpec) -> SampleSpec | None:
        planner = self.planner
        digests = "|".join(planner.records[g].digests[f] for g, f in spec.images)
        key = hashlib.sha1(f"{spec.task}\0{spec.problem}\0{spec.answer}\0{digests}".encode()).hexdigest()
        if key in planner._seen:
            planner.skips.append([spec.episode_id, "duplicate sample: same question, images and answer"])
            return None
        planner._seen.add(key)
        return spec

    def episode(self, rec: EpisodeRecord) -> list[SampleSpec]:
        """The samples of one episode (``samples_per_episode`` attempts; failures become counted skips)."""
        rng = _rng(self.cfg.seed, rec.episode_id)
        out = []
        for _ in range(self.cfg.samples_per_episode):
            task = self.tasks.pick()
            window = self.planner.window(rec, rng)
            if window is None:
                self.tasks.undo(task)
                self.planner.skips.append([rec.episode_id, "no distinct window: fewer than 4 frames that are "
                                                           "not near-duplicates of each other"])
                break
            spec = self._ordering(rec, window, rng) if task == "ordering" else self._choice(task, rec, window, rng)
            if spec is None:
                self.tasks.undo(task)
                self.planner.skips.append([rec.episode_id, f"not enough distractors: too few distinct frames "
                                                           f"for a {task} question"])
                continue
            kept = self._keep(spec)
            if kept is not None:
                out.append(kept)
        return out

    def _negative(self, rec: EpisodeRecord, rng) -> tuple[str, str, str]:
        """(kind drawn, kind made, description) for a multiple-choice question."""
        drawn = self.negatives.pick()
        if drawn == "swap":
            text = self._swap_text(rec, rng)
            if text is not None:
                return drawn, "swap", text
            self.planner.stats["swap_unavailable"] += 1
            return drawn, "missing", rec.description
        return drawn, drawn, rec.description

    @staticmethod
    def _slot(negative: str, target: int, none_pos: int, rng) -> int:
        """Where the true candidate goes among the 4 non-None options (letter ``target`` for positives)."""
        if negative:
            return rng.randrange(N_CANDIDATES)
        return target if target < none_pos else target - 1

    def _letters(self, negative: str) -> tuple[int, int]:
        """(answer position, None position) among the 5 options; equal for negatives."""
        target = CHOICE_LETTERS.index(self.letters.pick())
        if negative:
            return target, target
        return target, CHOICE_LETTERS.index(self.nones.pick(exclude=CHOICE_LETTERS[target]))

    def _ordering(self, rec: EpisodeRecord, window: list[int], rng) -> SampleSpec | None:
        perm = list(range(4))
        rng.shuffle(perm)                                 # label j shows step perm[j]
        labels = "ABCD"
        answer = "".join(labels[perm.index(step)] for step in range(4))
        images = tuple((rec.gid, window[perm[j]]) for j in range(4))
        form = self.forms.pick()
        if form == "perm":
            q = ordering.build(4, description=rec.description or None).with_answer(answer)
            return self._spec("ordering", rec, "", q, images)
        _, negative, text = self._negative(rec, rng)
        target, none_pos = self._letters(negative)
        choices = self.planner.permutations(answer, 4 if negative == "missing" else 3, rng)
        if negative != "missing":
            choices.insert(self._slot(negative, target, none_pos, rng), answer)
        q = ordering.build_mcq(4, choices, none_position=none_pos, description=text or None)
        truth = q.none_letter if negative else CHOICE_LETTERS[target]
        return self._spec("ordering_mcq", rec, negative, q.with_answer(truth, negative=bool(negative)), images)

    def _choice(self, task: str, rec: EpisodeRecord, window: list[int], rng) -> SampleSpec | None:
        w = window
        n = len(rec)
        if task == "next":       # steps 1, 2, 4 given; step 3 asked; frames before step 2 or after step 4 are wrong
            context, answer = [w[0], w[1], w[3]], w[2]
            local = [i for i in range(n) if (i < w[1] and i != w[0]) or i > w[3]]
        else:                    # steps 2, 3, 4 given; step 1 asked; any frame after step 2 is wrong
            context, answer = [w[1], w[2], w[3]], w[0]
            local = [i for i in range(n) if i > w[1] and i not in (w[2], w[3])]
        drawn, negative, text = self._negative(rec, rng)
        need = N_CANDIDATES if negative == "missing" else N_CANDIDATES - 1
        found = self.planner.distractors(rec, answer, local, need, rng)
        if found is None:
            self.negatives.undo(drawn)
            return None
        target, none_pos = self._letters(negative)
        candidates = list(found)
        rng.shuffle(candidates)
        if negative != "missing":
            candidates.insert(self._slot(negative, target, none_pos, rng), (rec.gid, answer))
        build = next_frame.build(2, N_CANDIDATES, with_goal=True, none_position=none_pos, description=text or None) \
            if task == "next" else previous.build(3, N_CANDIDATES, none_position=none_pos, description=text or None)
        truth = build.none_letter if negative else CHOICE_LETTERS[target]
        images = tuple((rec.gid, f) for f in context) + tuple(candidates)
        return self._spec(task, rec, negative, build.with_answer(truth, negative=bool(negative)), images)

    def _spec(self, task: str, rec: EpisodeRecord, negative: str, question, images) -> SampleSpec:
        if question.n_images != len(images):  # the contract's image layout and ours must agree
            raise RuntimeError(f"{task}: question has {question.n_images} images, plan has {len(images)}")
        return SampleSpec(split=self.split, task=task, domain=rec.domain, episode_id=rec.episode_id,
                          negative=negative, problem=question.problem, answer=question.answer, images=images,
                          none_letter=question.none_letter)


def plan_samples(planner: Planner, usable: list[EpisodeRecord]) -> dict[str, list[SampleSpec]]:
    """All samples, per split, in episode order."""
    out: dict[str, list[SampleSpec]] = {}
    for split in ("train", "test"):
        members = [r for r in usable if planner.split_of[r.gid] == split]
        maker = SampleMaker(planner, split)
        maker.collect_descriptions(members)
        out[split] = [s for rec in members for s in maker.episode(rec)]
    return out
