"""The TPRU prompt and answer contract: pure functions, no torch (shared by the SDK and finetune)."""

from tpru_agent.tasks import next_frame, ordering, previous
from tpru_agent.tasks.answer import (
    Parsed,
    accuracy_score,
    extract_answer,
    extract_think,
    format_score,
    normalize_tags,
    parse_response,
    tpru_reward,
)
from tpru_agent.tasks.prompt import DEFAULT_PREAMBLE, render_prompt
from tpru_agent.tasks.question import (
    IMAGE,
    LETTERS,
    NONE_TEXT,
    TASKS,
    Option,
    Question,
    continuation,
    describe,
    split_images,
)

__all__ = [
    "DEFAULT_PREAMBLE", "IMAGE", "LETTERS", "NONE_TEXT", "TASKS", "Option", "Parsed", "Question",
    "accuracy_score", "continuation", "describe", "extract_answer", "extract_think", "format_score",
    "next_frame", "normalize_tags", "ordering", "parse_response", "previous", "render_prompt", "split_images", "tpru_reward",
]
