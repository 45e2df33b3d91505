"""Previous-Frame Review: given later steps, which candidate is the step just before them?

TPRU's form gives steps 2, 3 and 4 and asks for step 1 among 4 candidates plus a "None" option.
"""

from __future__ import annotations

from tpru_agent.errors import ConfigError
from tpru_agent.tasks.next_frame import choice_question
from tpru_agent.tasks.question import Question


def build(n_later: int, n_candidates: int, *, none_position: int | None = -1,
          description: str | None = None) -> Question:
    """Which candidate is step 1, given steps 2..n_later+1?

    Example:
        >>> q = build(3, 4, none_position=0)
        >>> q.context_steps, q.target_step, q.none_letter
        ((2, 3, 4), 1, 'A')
    """
    if n_later < 1:
        raise ConfigError("previous-frame review needs at least one later frame")
    steps = tuple(range(2, n_later + 2))
    return choice_question("previous", steps, 1, n_candidates, "Which option shows step 1?",
                           none_position=none_position, description=description)
