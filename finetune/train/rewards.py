"""TPRU rewards as TRL reward functions: ``reward(completions, answer, **kwargs) -> list[float]``.

Every function takes the completions TRL hands over (plain strings, or conversational
``[{"role": "assistant", "content": ...}]`` lists) and the ``answer`` column of the dataset, and returns one float
per completion. They are pure Python (no torch). The training reward follows the TPRU authors' reward function
(EasyR1 ``reward.py``) to the letter, including its strictness: see :func:`reference_scores`. Inference parsing
(:func:`tpru_agent.tasks.parse_response`) stays lenient and flags what it accepted; training does not.

Rewards by name (``FinetuneConfig.rewards`` takes these names, or ``"package.module:function"`` for your own):

- ``tpru`` (default): the reference reward, 0.9 * exact match + 0.1 * format (format worth 0.2), 0.92 at best.
  Exactly the authors' numbers: a backtick-wrapped answer (`` `CABD` ``) or one with spaces inside its quotes
  (``" CABD "``) scores 0 accuracy, and a ground truth with surrounding whitespace never matches.
- ``tpru_partial``: the same, except that a permutation answer (ordering) earns *pairwise agreement* instead of
  0/1: the fraction of label pairs the response puts in the same relative order as the ground truth. ``"CABD"``
  against ``"CABD"`` is 1; ``"CBAD"`` (one adjacent swap) agrees on 5 of 6 pairs, 0.833; the reverse order is 0.
  A response that is not a permutation of the same labels earns 0 accuracy. Letter answers stay exact match. A
  denser signal for orderings, at the price of rewarding near misses (off the paper's recipe).
- ``label_density``: fraction of the response's non-space characters that are labels of the answer (``A``-``D``
  for ``"CABD"``). Not a TPRU reward: a dense shaping signal, nonzero even for a random model, for smoke tests
  and cold starts where every exact-match reward is 0 (GRPO advantages, and thus gradients, are then all 0).

Each TPRU reward also reports, through TRL's ``log_metric`` hook, the batch's exact-match ``accuracy`` and
``format`` rate, which the run's metrics and plots show.

Example:
    >>> tpru([[{"role": "assistant", "content": "<think>x</think><answer>CABD</answer>"}]], ["CABD"])
    [0.92]
    >>> tpru_partial(["<think>x</think><answer>CBAD</answer>"], ["CABD"])
    [0.77]
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from itertools import combinations

from tpru_agent.errors import ConfigError, close_matches
from tpru_agent.tasks.answer import ACCURACY_WEIGHT, FORMAT_SCORE, FORMAT_WEIGHT

RewardFunc = Callable[..., list[float]]


def completion_text(completion) -> str:
    """The text of one completion, plain or conversational (the last message's content, text parts joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else completion[-1]
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if isinstance(completion, (list, tuple)) and not completion:
        return ""
    raise ConfigError(f"cannot read a completion of type {type(completion).__name__}: expected a string or a list "
                      "of chat messages")


# The authors' reward (TPRU repository, examples/reward_function/reward.py, Apache-2.0), rule for rule: whitespace
# around "<", ">" and "/" is removed first; format needs the whole text to be one think block and one answer block
# of capital letters; accuracy takes the first answer block, strips whitespace, then double and single quotes
# (not backticks, and no second whitespace strip), and compares it with the ground truth as given (not stripped).
_REF_TAG_SPACE = re.compile(r"\s*(<|>|/)\s*")
_REF_FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>\s*([A-Z]+)\s*</answer>$", re.DOTALL)
_REF_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def reference_answer(completion: str) -> str | None:
    """The answer the authors' reward reads: first answer block, whitespace then ``"``/``'`` stripped (or ``None``).

    Example:
        >>> reference_answer('<think>x</think><answer> "CABD" </answer>'), reference_answer("<answer>`C`</answer>")
        ('CABD', '`C`')
    """
    match = _REF_ANSWER.search(_REF_TAG_SPACE.sub(r"\1", completion))
    return None if match is None else match.group(1).strip().strip("\"'")


def reference_scores(completion: str, ground_truth: str) -> dict[str, float]:
    """``{"overall", "format", "accuracy"}`` exactly as the TPRU authors' reward computes them.

    Example:
        >>> reference_scores("<think>x</think><answer>CABD</answer>", "CABD")["overall"]
        0.92
        >>> reference_scores("<think>x</think><answer>CABD</answer>", " CABD")["overall"]  # not stripped
        0.02
    """
    normalized = _REF_TAG_SPACE.sub(r"\1", completion)
    fmt = FORMAT_SCORE if _REF_FORMAT.fullmatch(normalized) else 0.0
    accuracy = 1.0 if reference_answer(completion) == ground_truth else 0.0
    return {"overall": round(ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * fmt, 10), "format": fmt,
            "accuracy": accuracy}


def pairwise_agreement(got: str | None, answer: str) -> float:
    """Fraction of label pairs ordered as in ``answer`` (1.0 exact, 0.0 reversed or not a permutation).

    Example:
        >>> pairwise_agreement("CBAD", "CABD")
        0.8333333333333334
    """
    answer = answer.strip()
    if len(answer) < 2 or len(set(answer)) != len(answer):  # not a permutation answer: exact match only
        return 1.0 if got == answer and answer else 0.0
    if got is None or sorted(got) != sorted(answer):
        return 0.0
    rank = {label: i for i, label in enumerate(got)}
    pairs = list(combinations(answer, 2))  # (earlier, later) in the ground truth
    return sum(rank[a] < rank[b] for a, b in pairs) / len(pairs)


def partial_reward(completion: str, answer: str) -> float:
    """0.9 * pairwise agreement (permutations) or exact match (letters) + 0.1 * format, read as the authors read.

    The answer is extracted and the format scored as in :func:`reference_scores`; on an exact or letter answer it
    equals the reference reward.
    """
    scores = reference_scores(completion, answer)
    if len(answer) < 2 or scores["accuracy"] == 1.0:
        return scores["overall"]
    accuracy = pairwise_agreement(reference_answer(completion), answer)
    return round(ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * scores["format"], 10)


def _check_lengths(completions: Sequence, answer: Sequence) -> None:
    if len(completions) != len(answer):
        raise ConfigError(f"{len(completions)} completions but {len(answer)} answers: the dataset needs an 'answer' "
                          "column (TPRU layout) and TRL repeats it once per generation")


def _log(kwargs: dict, texts: list[str], answer: Sequence[str]) -> None:
    log_metric = kwargs.get("log_metric")
    if log_metric is None or not texts:
        return
    scores = [reference_scores(t, a) for t, a in zip(texts, answer)]
    log_metric("accuracy", sum(s["accuracy"] for s in scores) / len(texts))
    log_metric("format", sum(s["format"] > 0 for s in scores) / len(texts))


def tpru(completions: Sequence, answer: Sequence[str], **kwargs) -> list[float]:
    """The reference TPRU reward for each completion (0.92 at best)."""
    _check_lengths(completions, answer)
    texts = [completion_text(c) for c in completions]
    _log(kwargs, texts, answer)
    return [reference_scores(t, a)["overall"] for t, a in zip(texts, answer)]


def tpru_partial(completions: Sequence, answer: Sequence[str], **kwargs) -> list[float]:
    """The TPRU reward with pairwise-agreement credit for orderings (see the module docstring)."""
    _check_lengths(completions, answer)
    texts = [completion_text(c) for c in completions]
    _log(kwargs, texts, answer)
    return [partial_reward(t, a) for t, a in zip(texts, answer)]


def label_density(completions: Sequence, answer: Sequence[str], **kwargs) -> list[float]:
    """Share of non-space characters that are labels of the answer: dense shaping for smoke tests, not TPRU."""
    _check_lengths(completions, answer)
    out = []
    for completion, truth in zip(completions, answer):
        text = "".join(completion_text(completion).split())
        labels = set(truth.strip()) | ({"A", "B", "C", "D", "E"} if len(truth.strip()) == 1 else set())
        out.append(sum(ch in labels for ch in text) / len(text) if text else 0.0)
    return out


REWARDS: dict[str, RewardFunc] = {"tpru": tpru, "tpru_partial": tpru_partial, "label_density": label_density}


def resolve_rewards(names: Sequence[str]) -> list[RewardFunc]:
    """Reward functions for ``names``: built-in names, or ``"package.module:function"`` import paths.

    Raises:
        ConfigError: an unknown name (with a close-match suggestion) or an import path that does not load.
    """
    if not names:
        raise ConfigError(f"at least one reward is needed; built-in rewards: {', '.join(REWARDS)}")
    funcs = []
    for name in names:
        if name in REWARDS:
            funcs.append(REWARDS[name])
            continue
        if ":" not in name:
            raise ConfigError(f"unknown reward {name!r}.{close_matches(name, REWARDS)} Built-in rewards: "
                              f"{', '.join(REWARDS)}; or give 'package.module:function'")
        module_name, attr = name.split(":", 1)
        try:
            func = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"reward {name!r} cannot be loaded ({exc}); it must be an importable "
                              "'package.module:function'") from exc
        if not callable(func):
            raise ConfigError(f"reward {name!r} is not callable")
        funcs.append(func)
    return funcs
