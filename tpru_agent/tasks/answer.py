"""The ``<think>...</think><answer>...</answer>`` contract: extraction, parsing and the TPRU reward.

The reward reproduces the reference computation (TPRU paper, EasyR1 recipe): whitespace around ``<``, ``>`` and
``/`` is removed first; *format* is worth 0.2 when the whole response is one think block followed by one answer
block of capital letters; *accuracy* compares the content of the first answer block with the ground truth
(surrounding whitespace and quotes ignored, case kept); overall = 0.9 * accuracy + 0.1 * format (0.92 at best).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from tpru_agent.errors import ParseError

_TAG_CHAR = re.compile(r"([<>/])")
_FORMAT = re.compile(r"<think>.*?</think><answer>[A-Z]+</answer>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_QUOTES = "\"'`"

FORMAT_WEIGHT = 0.1
ACCURACY_WEIGHT = 0.9
FORMAT_SCORE = 0.2


def normalize_tags(text: str) -> str:
    """Remove whitespace around ``<``, ``>`` and ``/`` (the reference reward's first step).

    The same result as ``re.sub(r"\\s*([<>/])\\s*", r"\\1", text)``, in linear time: that regex retries a long
    whitespace run from each of its characters (40k spaces took 40 s; issue 14).

    Example:
        >>> normalize_tags("< answer > B </ answer >")
        '<answer>B</answer>'
    """
    parts = _TAG_CHAR.split(text)  # even indices: the text between tag characters; odd: the characters
    last = len(parts) - 1
    for k in range(0, len(parts), 2):
        part = parts[k].lstrip() if k > 0 else parts[k]
        parts[k] = part.rstrip() if k < last else part
    return "".join(parts)


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
    """A response reduced to its answer string and its reasoning (if any).

    Attributes:
        answer: the validated answer (``"CABD"``, ``"B"``).
        think: the reasoning inside the first ``<think>`` block, or ``None``.
        well_formed: the response is exactly the trained format, one ``<think>`` block then one ``<answer>`` block
            of capital letters, with no answer tag inside the reasoning. ``False`` means the answer was read
            leniently (missing tags, quotes, ``C-A-B-D``, ``(B)``, an answer written inside ``<think>``...).
        prefix: the response up to the answer block that was read (what the answer is scored after).
    """

    answer: str
    think: str | None
    well_formed: bool
    prefix: str = ""


# Tags as the reference reward sees them (whitespace next to "<", ">" and "/" ignored), found in one linear scan.
_TAG = re.compile(r"<\s*(/?)\s*(think|answer)\s*>")


@dataclass(frozen=True)
class _Block:
    start: int
    content: str
    in_think: bool


def _answer_blocks(raw: str) -> list[_Block]:
    """Every closed ``<answer>`` block, marked when it lies inside the reasoning.

    Inside the reasoning means after an open ``<think>`` not yet closed, or before a stray ``</think>`` (models whose
    chat template opens the think block for them write only its end).
    """
    blocks: list[_Block] = []
    in_think, opened = False, None
    for tag in _TAG.finditer(raw):
        closing, name = tag.group(1) == "/", tag.group(2)
        if name == "think":
            if closing and not in_think:  # a stray end: everything so far was reasoning
                blocks = [_Block(b.start, b.content, True) for b in blocks]
                opened = None if opened is None else (opened[0], opened[1], True)
            in_think = not closing
        elif not closing:
            opened = opened or (tag.start(), tag.end(), in_think)
        elif opened is not None:
            blocks.append(_Block(opened[0], raw[opened[1]:tag.start()], opened[2]))
            opened = None
    return blocks


def _content(text: str) -> str:
    return normalize_tags(text).strip().strip(_QUOTES).strip()


def _chosen_block(raw: str) -> tuple[_Block | None, list[str], bool]:
    """The block that holds the answer (the first outside the reasoning, else the first inside it), the distinct
    contents of its group (outside blocks, or inside ones when there are no outside ones), and whether any answer
    block lies inside the reasoning."""
    blocks = _answer_blocks(raw)
    group = [b for b in blocks if not b.in_think] or blocks
    distinct = list(dict.fromkeys(_content(b.content) for b in group))
    return (group[0] if group else None), distinct, any(b.in_think for b in blocks)


def parse_response(raw: str, valid: "callable[[str], str | None]") -> Parsed:
    """Parse a response and validate its answer with ``valid`` (returns an error message or ``None``).

    Accepts the trained format; when the answer tags are missing, a response that is nothing but a valid
    answer (``"CABD"``) is accepted too, as are sloppy spellings of one answer (``"C-A-B-D"``, ``"(B)"``); those
    are marked ``well_formed=False``. An ``<answer>`` outside the reasoning wins over one inside it. Anything
    else raises :class:`ParseError` carrying ``raw``, in particular an answer that names more than one option
    (``"A or B"``, ``"A/B"``, ``"B. Actually C"``) or several different answer blocks.

    Example:
        >>> parse_response("<think>x</think><answer>B</answer>", lambda a: None if a in "ABC" else "no").answer
        'B'
    """
    block, distinct, answered_in_think = _chosen_block(raw)
    think = extract_think(raw)
    if block is None:
        bare = _THINK.sub("", raw).strip().strip(_QUOTES).strip()
        if bare and valid(bare) is None:
            return Parsed(bare, think, False, raw)
        raise ParseError("no <answer>...</answer> block in the model output", raw=raw)
    if len(distinct) > 1:
        raise ParseError(f"the output gives {len(distinct)} different answers ({', '.join(map(repr, distinct))}); "
                         "cannot tell which one the model meant", raw=raw)
    answer, prefix = distinct[0], raw[: block.start]
    well_formed = format_score(raw) > 0 and not answered_in_think
    if not answer:
        raise ParseError("the <answer> block is empty", raw=raw)
    problem = valid(answer)
    if problem is None:
        return Parsed(answer, think, well_formed, prefix)
    return Parsed(_lenient_reading(answer, problem, valid, raw), think, False, prefix)


_LEADING_LETTER = re.compile(r"^\W*([A-Z])(?:\W|$)")
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z])[A-Z](?![A-Za-z])")
_SEPARATED = re.compile(r"[A-Z\s,;\-–>.()]+")


def _lenient_reading(answer: str, problem: str, valid, raw: str) -> str:
    """The one answer a sloppy answer text means (``C, A, B, D``; ``(B)``; ``E. None of ...``), else ParseError.

    The capital letters alone are read first (a permutation written with separators); then a leading option
    letter, but only when the text names no other valid option: ``"A or B"``, ``"A/B"``, ``"A B C D E"`` and
    ``"B. Actually C"`` name several (issue 14: they once became their first letter).
    """
    if _SEPARATED.fullmatch(answer):
        letters = re.sub(r"[^A-Z]", "", answer)
        if valid(letters) is None:
            return letters
    lead = _LEADING_LETTER.match(answer)
    if lead and valid(lead.group(1)) is None:
        named = list(dict.fromkeys(c for c in _LONE_CAPITAL.findall(answer) if valid(c) is None))
        if len(named) > 1:
            raise ParseError(f"the answer {answer!r} names more than one option ({', '.join(named)})", raw=raw)
        return lead.group(1)
    raise ParseError(f"invalid answer {answer!r}: {problem}", raw=raw)


def reasoning_prefix(raw: str) -> str:
    """The response up to the answer block :func:`parse_response` reads (spaces inside tags allowed), or all of
    it when there is none: what the answer is scored after.

    Example:
        >>> reasoning_prefix("<think>a <answer>B</answer></think><answer>C</answer>")
        '<think>a <answer>B</answer></think>'
    """
    block, _, _ = _chosen_block(raw)
    return raw if block is None else raw[: block.start]


@dataclass(frozen=True)
class Answer:
    """One question answered (``TPRU.ask``): the chosen answer, the distribution over all valid answers, evidence,
    timings."""

    answer: str
    probabilities: dict[str, float]
    raw: str
    timings: dict[str, float] = field(default_factory=dict)
    #: the generated answer was read by a lenient parse (not the strict trained format; see ``Parsed``)
    lenient: bool = False

    @property
    def confidence(self) -> float:
        return self.probabilities.get(self.answer, 0.0)


def softmax(scores: dict[str, float]) -> dict[str, float]:
    """Normalise log-scores into probabilities (stable)."""
    top = max(scores.values())
    exp = {k: math.exp(v - top) for k, v in scores.items()}
    total = sum(exp.values())
    return {k: v / total for k, v in exp.items()}
