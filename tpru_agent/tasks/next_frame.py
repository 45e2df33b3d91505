"""Next-Frame Prediction: given the steps so far (and optionally the final step), which candidate comes next?

TPRU's form gives steps 1, 2 and the final step 4 and asks for step 3 among 4 candidates plus a "None of the
choices provided" option. Here the history length, the goal frame and the candidate count are free.
"""

from __future__ import annotations

from tpru_agent.errors import ConfigError
from tpru_agent.tasks.question import (
    IMAGE,
    MAX_CANDIDATES,
    MAX_IMAGES,
    Question,
    choice_options,
    describe,
    option_lines,
)


def context_block(steps: tuple[int, ...], final: bool = False) -> str:
    """One line per context image: ``"Step 1: <image>"``; with ``final`` the last one is ``"Final step: <image>"``."""
    return "\n".join(f"{'Final step' if final and i == len(steps) - 1 else f'Step {s}'}: {IMAGE}"
                     for i, s in enumerate(steps))


def _shown(steps: tuple[int, ...], final: bool) -> str:
    names = [str(s) for s in steps[:-1]] + ["the final step" if final else str(steps[-1])]
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]


def check_sizes(n_context: int, n_candidates: int) -> None:
    """Raise :class:`ConfigError` when a choice question would be empty or too large."""
    if n_context < 1:
        raise ConfigError("at least one context frame is needed")
    if not 1 <= n_candidates <= MAX_CANDIDATES:
        raise ConfigError(f"1..{MAX_CANDIDATES} candidate frames are supported, got {n_candidates}")
    if n_context + n_candidates > MAX_IMAGES:
        raise ConfigError(f"{n_context + n_candidates} images in one question; at most {MAX_IMAGES} are supported")


def choice_question(task: str, steps: tuple[int, ...], target: int, n_candidates: int, ask: str, *,
                    none_position: int | None, description: str | None, final: bool = False) -> Question:
    """Shared body of the next / previous questions: context steps, then lettered candidate images."""
    check_sizes(len(steps), n_candidates)
    options = choice_options(list(range(n_candidates)), none_position=none_position)
    lead = describe(description)
    shown = _shown(steps, final)
    # Nothing before the images depends on how many there are: a control loop that appends a frame to its history
    # then shares the whole earlier prompt prefix (and its cached keys/values) with the previous call.
    problem = (
        (lead + " " if lead else "")
        + "The images below show steps of the procedure, each labelled with its step number.\n"
        + context_block(steps, final)
        + f"\nThese are {'steps' if len(steps) > 1 else 'step'} {shown}. {ask}\n"
        + option_lines(options, lambda _: IMAGE)
    )
    return Question(task, problem, len(steps) + n_candidates, tuple(o.letter for o in options), options=options,
                    context_steps=steps, target_step=target, description=description)


def build(n_history: int, n_candidates: int, *, with_goal: bool = False, none_position: int | None = -1,
          description: str | None = None) -> Question:
    """Which candidate is step ``n_history + 1``? With ``with_goal`` the last context image is the final step.

    Example:
        >>> q = build(2, 4, with_goal=True)   # TPRU's form: steps 1, 2 and 4 given, which is step 3?
        >>> q.context_steps, q.target_step, q.none_letter
        ((1, 2, 4), 3, 'E')
    """
    if n_history < 1:
        raise ConfigError("next-frame prediction needs at least one history frame")
    steps = tuple(range(1, n_history + 1)) + ((n_history + 2,) if with_goal else ())
    target = n_history + 1
    ask = f"Which option shows step {target}?"
    # The goal is labelled "Final step", not "Step n+2": a control loop passes the end of the whole procedure,
    # which is rarely the step right after the one asked about.
    return choice_question("next", steps, target, n_candidates, ask, none_position=none_position,
                           description=description, final=with_goal)
