"""The ``<think>...</think><answer>...</answer>`` contract: extraction, parsing and the TPRU reward.

The reward reproduces the reference computation (TPRU paper, EasyR1 recipe): whitespace around ``<``, ``>`` and
``/`` is removed first; *format* is worth 0.2 when the whole response is one think block followed by one answer
block of capital letters; *accuracy* compares the content of the first answer block with the ground truth
(surrounding whitespace and quotes ignored, case kept); overall = 0.9 * accuracy + 0.1 * format (0.92 at best).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ParseError

_TAG_SPACE = re.compile(r"\s*([<>/])\s*")
_FORMAT = re.compile(r"<think>.*?</think><answer>[A-Z]+</answer>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_QUOTES = "\"'`"

FORMAT_WEIGHT = 0.1
ACCURACY_WEIGHT = 0.9
FORMAT_SCORE = 0.2


def normalize_tags(text: str) -> str:
    """Remove whitespace around ``<``, ``>`` and ``/`` (the reference reward's first step)."""
    return _TAG_SPACE.sub(r"\1", text)


def extract_answer(text: str) -> str | None:
    """Content of the first ``<answer>`` block, stripped of whitespace and quotes; ``None`` when absent.

    Example:
        >>> extract_answer("<think>x</think><answer> CABD </answer>")
        'CABD'
    """
    match = _ANSWER.search(normalize_tags(text))
    if match is None:
        return None
    return match.group(1).strip().strip(_QUOTES).strip()


def extract_think(text: str) -> str | None:
    """The reasoning inside the first ``<think>`` block, or ``None``."""
    match = _THINK.search(text)
    return match.group(1).strip() if match else None


def format_score(completion: str) -> float:
    """0.2 when the whole response is ``<think>...</think><answer>[A-Z]+</answer>``, else 0."""
    return FORMAT_SCORE if _FORMAT.fullmatch(normalize_tags(completion)) else 0.0


def accuracy_score(completion: str, answer: str) -> float:
    """1.0 when the first answer block equals ``answer`` exactly (case-sensitive), else 0."""
    got = extract_answer(completion)
    return 1.0 if got is not None and got != "" and got == answer.strip() else 0.0


def tpru_reward(completion: str, answer: str) -> float:
    """The TPRU training reward: 0.9 * accuracy + 0.1 * format (format worth 0.2), so 0.92 at best.

    Example:
        >>> tpru_reward("<think>C first</think><answer>CABD</answer>", "CABD")
        0.92
    """
    score = ACCURACY_WEIGHT * accuracy_score(completion, answer) + FORMAT_WEIGHT * format_score(completion)
    return round(score, 10)


@dataclass(frozen=True)
class Parsed:
    """A response reduced to its answer string and its reasoning (if any)."""

    answer: str
    think: str | None
    well_formed: bool


def parse_response(raw: str, valid: "callable[[str], str | None]") -> Parsed:
    """Parse a response and validate its answer with ``valid`` (returns an error message or ``None``).

    Accepts the trained format; when the answer tags are missing, a response that is nothing but a valid
    answer (``"CABD"``) is accepted too. Anything else raises :class:`ParseError` carrying ``raw``.
    """
    answer = extract_answer(raw)
    if answer is None:
        bare = _THINK.sub("", raw).strip().strip(_QUOTES).strip()
        if bare and valid(bare) is None:
            return Parsed(bare, extract_think(raw), False)
        raise ParseError("no <answer>...</answer> block in the model output", raw=raw)
    if not answer:
        raise ParseError("the <answer> block is empty", raw=raw)
    problem = valid(answer)
    if problem is None:
        return Parsed(answer, extract_think(raw), format_score(raw) > 0)
    for variant in _variants(answer):  # untuned models write "C-A-B-D", "(B)", "E. None of ...": accept, flagged
        if valid(variant) is None:
            return Parsed(variant, extract_think(raw), False)
    raise ParseError(f"invalid answer {answer!r}: {problem}", raw=raw)


_LEADING_LETTER = re.compile(r"^\W*([A-Z])(?:\W|$)")


def _variants(answer: str) -> list[str]:
    """Readings of a sloppy answer: the capital letters alone (``C, A, B, D``), or a leading option letter."""
    out = [re.sub(r"[^A-Z]", "", answer)] if re.fullmatch(r"[A-Z\s,;\-–>.()]+", answer) else []
    lead = _LEADING_LETTER.match(answer)
    return out + ([lead.group(1)] if lead else [])


_ANSWER_OPEN = re.compile(r"<\s*answer\s*>")


def reasoning_prefix(raw: str) -> str:
    """The response up to its first answer tag (spaces inside the tag allowed): what the answer is scored after."""
    match = _ANSWER_OPEN.search(raw)
    return raw[: match.start()] if match else raw
