"""Temporal Reordering: shuffled frames labelled A, B, C, ...; the answer is the label permutation in time order.

Two forms, as in TPRU: a permutation string (``"CABD"``: the image labelled C comes first) and a multiple choice
among candidate permutations with one "None of the choices provided" option.
"""

from __future__ import annotations

from tpru_agent.errors import ConfigError
from tpru_agent.tasks.question import IMAGE, MAX_ORDER_LABELS, Question, choice_options, describe, letters, option_lines


def _frames_intro(n: int, description: str | None) -> tuple[tuple[str, ...], str]:
    """The labels and the shared opening: description, "The n images below ...", one labelled line per image."""
    if not 2 <= n <= MAX_ORDER_LABELS:
        raise ConfigError(f"one ordering question holds 2..{MAX_ORDER_LABELS} frames, got {n}")
    labels = letters(n)
    lead = describe(description)
    text = (
        (lead + " " if lead else "")
        + f"The {n} images below are frames of one procedure in shuffled order, labelled "
        + ", ".join(labels[:-1]) + f" and {labels[-1]}.\n"
        + "\n".join(f"Image {label}: {IMAGE}" for label in labels)
    )
    return labels, text


def build(n_frames: int, *, description: str | None = None) -> Question:
    """An ordering question over ``n_frames`` frames (2..4) answered with a permutation string.

    Example:
        >>> q = build(4, description="making coffee")
        >>> q.problem.count("<image>"), q.answers()[:2]
        (4, ('ABCD', 'ABDC'))
    """
    labels, intro = _frames_intro(n_frames, description)
    problem = (intro + "\nWhat is the correct temporal order of the images? Answer with the labels in order, "
               "for example " + "".join(reversed(labels)) + ".")
    return Question("ordering", problem, n_frames, labels, description=description)


def build_mcq(n_frames: int, choices: list[str], *, none_position: int | None = -1,
              description: str | None = None) -> Question:
    """An ordering question whose options are candidate permutations (plus a "None" option).

    Example:
        >>> q = build_mcq(4, ["ABCD", "DCBA", "BADC", "CABD"], none_position=2)
        >>> q.none_letter, q.option("A").value
        ('C', 'ABCD')
    """
    labels, intro = _frames_intro(n_frames, description)
    for perm in choices:
        if sorted(perm) != sorted(labels):
            raise ConfigError(f"choice {perm!r} is not a permutation of {''.join(labels)}")
    if len(set(choices)) != len(choices):
        raise ConfigError(f"choices repeat a permutation: {choices}")
    options = choice_options(list(choices), none_position=none_position)
    problem = (intro + "\nWhich option gives the correct temporal order of the images?\n"
               + option_lines(options, lambda perm: "-".join(perm)))
    return Question("ordering_mcq", problem, n_frames, tuple(o.letter for o in options), options=options,
                    description=description)
