"""``OUT/manifest.json`` of a build: what went in, what came out, what was skipped and why.

Deterministic (no times, no output paths) so that two builds of the same settings have byte-identical manifests.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tpru_agent.finetune.data.plan import CHOICE_LETTERS
from tpru_agent.finetune.data.tpru_format import budget_record, content_hash

FORMAT = "tpru-data/1"
#: The most skip entries listed one by one (all are counted).
MAX_LISTED_SKIPS = 2000


def split_counts(samples: list) -> dict:
    """Counts of one split's samples by task, domain, answer letter, "None" position and negative kind."""
    choice = [s for s in samples if s.none_letter is not None]
    letters = Counter(s.answer for s in choice)
    five = [s for s in choice if len(s.answer) == 1]
    share = max(letters.values()) / len(five) if five else 0.0
    return {
        "samples": len(samples),
        "tasks": dict(sorted(Counter(s.task for s in samples).items())),
        "domains": dict(sorted(Counter(s.domain for s in samples).items())),
        "answer_letters": {c: letters.get(c, 0) for c in CHOICE_LETTERS},
        "none_positions": {c: Counter(s.none_letter for s in choice).get(c, 0) for c in CHOICE_LETTERS},
        "ordering_first_label": dict(sorted(Counter(s.answer[0] for s in samples if s.task == "ordering").items())),
        "negatives": {"total": sum(bool(s.negative) for s in samples),
                      "description_swap": sum(s.negative == "swap" for s in samples),
                      "answer_removed": sum(s.negative == "missing" for s in samples)},
        "negatives_by_task": dict(sorted(Counter(s.task for s in samples if s.negative).items())),
        "max_letter_share": round(share, 4),
    }


def build_manifest(cfg, specs, prefixes, units, planner, samples: dict, source_skips: list, out: Path,
                   builder_version: str) -> dict:
    """The manifest dict (see the module docstring)."""
    from tpru_agent import __version__

    source_text = {prefixes[i]: spec.text for i, spec in enumerate(specs)}
    skips = [{"source": s, "episode": e, "reason": r} for s, e, r in source_skips]
    skips += [{"source": source_text.get(e.split(":", 1)[0], ""), "episode": e, "reason": r} for e, r in planner.skips]
    episodes = {split: [] for split in ("train", "test")}
    for gid in sorted(planner.split_of):
        rec = planner.records[gid]
        episodes[planner.split_of[gid]].append({"id": rec.episode_id, "task": rec.task, "domain": rec.domain,
                                                "frames": len(rec), "source": source_text[prefixes[rec.source]]})
    per_source = []
    for i, spec in enumerate(specs):
        made = [r for r in planner.records.values() if r.source == i]
        per_source.append({"spec": spec.text, "kind": spec.kind, "prefix": prefixes[i],
                           "units": sum(u.source == i for u in units), "episodes_cached": len(made),
                           "episodes_used": sum(r.gid in planner.split_of for r in made),
                           "skipped": sum(s["source"] == spec.text for s in skips)})
    files = {}
    for split in ("train", "test"):
        n = len(samples[split])
        for index, start in enumerate(range(0, n, cfg.shard_size)):
            files[f"{split}/part-{index:05d}.parquet"] = min(cfg.shard_size, n - start)
    paths = [out / name for name in files]
    return {
        "format": FORMAT,
        "code_version": {"tpru_agent": __version__, "builder": builder_version},
        "seed": cfg.seed,
        "settings": cfg.settings(),
        "fingerprint": cfg.settings_digest(),
        # frames are stored at their served size for this budget (episode_cache sizes them with fit_budget):
        # training and eval at the same budget must not size them again (tpru_format.stored_budget)
        "frames_budget": budget_record(),
        "sources": per_source,
        "episodes": {"train": len(episodes["train"]), "test": len(episodes["test"]),
                     "near_duplicate_groups": planner.stats.get("near_duplicate_groups", 0), "list": episodes},
        "samples": {split: len(samples[split]) for split in ("train", "test")},
        "counts": {split: split_counts(samples[split]) for split in ("train", "test")},
        "swap_unavailable": planner.stats.get("swap_unavailable", 0),
        "skips": {"total": len(skips),
                  "by_reason": dict(sorted(Counter(s["reason"].split(":")[0] for s in skips).items())),
                  "listed": skips[:MAX_LISTED_SKIPS]},
        "files": files,
        "content_hash": content_hash(paths, out),
    }
