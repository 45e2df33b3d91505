"""The question every task renders: text with one ``<image>`` per image, the valid answers and what they mean.

A :class:`Question` is the single currency between the SDK (inference), the data builder (training rows in the
TPRU-25k layout: ``problem`` / ``images`` / ``answer``) and every engine, so training and inference prompts cannot
drift. Pure Python: no torch, no images.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

from tpru_agent.errors import ConfigError

IMAGE = "<image>"
NONE_TEXT = "None of the choices provided"
LETTERS = "ABCDEFGHIJ"
TASKS = ("ordering", "ordering_mcq", "next", "previous")
#: The most frames one ordering question holds: TPRU was trained on 4 (labels A-D).
MAX_ORDER_LABELS = 4
MAX_CANDIDATES = 8
#: Qwen2.5-VL was tuned with at most 7 images per prompt; more is allowed but leaves the trained range.
MAX_IMAGES = 16


@dataclass(frozen=True)
class Option:
    """One multiple-choice option.

    ``value`` is the candidate index (next / previous frame), the permutation string (ordering as multiple
    choice), or ``None`` for the "None of the choices provided" option.
    """

    letter: str
    value: int | str | None


@dataclass(frozen=True)
class Question:
    """A rendered TPRU question and its answer space.

    Image layout: ordering questions show the frames labelled ``labels`` in input order; next / previous
    questions show the context images (steps ``context_steps``, in that order) and then the candidate images in
    option order (the "None" option has no image).
    """

    task: str
    problem: str
    n_images: int
    labels: tuple[str, ...]
    options: tuple[Option, ...] = ()
    context_steps: tuple[int, ...] = ()
    target_step: int | None = None
    description: str | None = None
    answer: str | None = None
    negative: bool = False
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def answer_format(self) -> str:
        """``"permutation"`` for ordering, ``"choice"`` for every multiple-choice form."""
        return "permutation" if self.task == "ordering" else "choice"

    @property
    def none_letter(self) -> str | None:
        """The letter of the "None of the choices provided" option, if there is one."""
        return next((o.letter for o in self.options if o.value is None), None)

    @property
    def n_candidates(self) -> int:
        """Number of candidate images (next / previous), 0 for ordering questions."""
        return sum(isinstance(o.value, int) for o in self.options)

    def answers(self) -> tuple[str, ...]:
        """Every valid answer string: all label permutations, or all option letters."""
        if self.answer_format == "permutation":
            return tuple("".join(p) for p in itertools.permutations(self.labels))
        return tuple(o.letter for o in self.options)

    def option(self, letter: str) -> Option:
        """The option with this letter (``KeyError`` when absent)."""
        for opt in self.options:
            if opt.letter == letter:
                return opt
        raise KeyError(letter)

    def validate(self, answer: str) -> str | None:
        """``None`` when ``answer`` is valid for this question, else what is wrong with it."""
        if self.answer_format == "permutation":
            want = len(self.labels)
            if len(answer) != want:
                return f"expected {want} labels from {''.join(self.labels)}, got {len(answer)}"
            unknown = sorted(set(answer) - set(self.labels))
            if unknown:
                return f"unknown label(s) {''.join(unknown)}; valid labels are {''.join(self.labels)}"
            if len(set(answer)) != len(answer):
                return f"repeated label(s) in {answer}"
            return None
        if answer not in {o.letter for o in self.options}:
            return f"expected one letter of {''.join(o.letter for o in self.options)}"
        return None

    def with_answer(self, answer: str, *, negative: bool | None = None) -> "Question":
        """A copy carrying the ground-truth answer (validated)."""
        problem = self.validate(answer)
        if problem is not None:
            raise ConfigError(f"ground truth {answer!r} is not a valid answer: {problem}")
        return replace(self, answer=answer, negative=self.negative if negative is None else negative)


def split_images(text: str, n_images: int) -> list[str]:
    """The text pieces around each ``<image>`` placeholder: ``n_images + 1`` strings (some may be empty).

    The one place a prompt is split at its images; every engine (and the server) builds its own message parts
    from these pieces, image ``i`` going between piece ``i`` and piece ``i + 1``.

    Raises:
        ConfigError: the placeholder count differs from ``n_images``.

    Example:
        >>> split_images("A: <image> B: <image>", 2)
        ['A: ', ' B: ', '']
    """
    pieces = text.split(IMAGE)
    if len(pieces) - 1 != n_images:
        raise ConfigError(
            f"the prompt has {len(pieces) - 1} {IMAGE} placeholder(s) but {n_images} image(s) were given; "
            f"put exactly one {IMAGE} in the text per image, in order"
        )
    return pieces


def continuation(answer: str) -> str:
    """The assistant text that states ``answer`` (what ``score`` compares across candidates)."""
    return f"<answer>{answer}</answer>"


def describe(description: str | None) -> str:
    """The procedure sentence TPRU uses ("These photos show the process of ..."), or ``""``."""
    if not description or not description.strip():
        return ""
    text = description.strip()
    if text.lower().startswith("these photos"):
        return text if text.endswith(".") else text + "."
    return f"These photos show the process of {text.rstrip('.')}."


def letters(n: int) -> tuple[str, ...]:
    """The first ``n`` option letters."""
    if not 0 < n <= len(LETTERS):
        raise ConfigError(f"between 1 and {len(LETTERS)} options are supported, got {n}")
    return tuple(LETTERS[:n])


def choice_options(values: list, *, none_position: int | None) -> tuple[Option, ...]:
    """Letter the values in order, inserting the "None" option at ``none_position`` (``None``: no such option).

    ``none_position`` may be ``-1`` for "last".
    """
    items = list(values)
    if none_position is not None:
        pos = len(items) if none_position == -1 else none_position
        if not 0 <= pos <= len(items):
            raise ConfigError(f"none_position must be in 0..{len(items)} or -1, got {none_position}")
        items.insert(pos, None)
    return tuple(Option(letter, value) for letter, value in zip(letters(len(items)), items))


def option_lines(options: tuple[Option, ...], render_value) -> str:
    """One line per option: ``"A. <image>"`` / ``"C. None of the choices provided"``."""
    return "\n".join(f"{o.letter}. {NONE_TEXT if o.value is None else render_value(o.value)}" for o in options)


def load_template(path: str | Path) -> str:
    """Read a Jinja preamble template (it must use ``{{ content }}``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt template {str(p)!r} does not exist; pass a Jinja file that uses {{{{ content }}}}")
    text = p.read_text(encoding="utf-8")
    if "content" not in text:
        raise ConfigError(f"prompt template {str(p)!r} never uses {{{{ content }}}}: the question would be lost")
    return text
