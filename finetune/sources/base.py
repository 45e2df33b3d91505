"""The episode: ordered frames of one procedure + a one-sentence description + domain + provenance."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Episode:
    """One recorded procedure.

    Attributes:
        episode_id: stable id, unique within its source (used for splits, dedup and resume).
        frames: RGB ``PIL.Image`` frames in temporal order.
        description: the procedure in words, e.g. "open the drawer" (rendered as "These photos show the process
            of ..."). For simulators it comes from the task identity, never from a model.
        domain: scenario family: "robot", "gui", "lego", "navigation", or a user's own.
        task: task identity within the domain (e.g. Meta-World "drawer-open-v3"), used for held-out splits and
            contradicting descriptions.
        meta: provenance (source kind, path, seed, success flag, camera ...), JSON-serialisable.
    """

    episode_id: str
    frames: tuple = field(repr=False)
    description: str
    domain: str
    task: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.frames)
