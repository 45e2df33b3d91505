"""The task contract: question building, parsing tables, the TPRU reward against the reference cases."""

from __future__ import annotations

import json
import sys

import pytest

from tpru_agent.errors import ConfigError, ParseError
from tpru_agent.tasks import (
    IMAGE,
    continuation,
    describe,
    extract_answer,
    format_score,
    next_frame,
    ordering,
    parse_response,
    previous,
    render_prompt,
    tpru_reward,
)


def test_task_modules_import_no_torch():
    assert "tpru_agent.tasks" in sys.modules
    import subprocess

    code = "import sys, tpru_agent, tpru_agent.tasks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------ reward: every reference row, exactly
def _reference_rows(reference_dir):
    path = reference_dir / "tpru-reward-cases.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_reward_reproduces_every_reference_case(reference_dir):
    rows = _reference_rows(reference_dir)
    assert len(rows) >= 30
    for row in rows:
        assert tpru_reward(row["completion"], row["answer"]) == row["overall"], row
        assert format_score(row["completion"]) == row["format"], row


@pytest.mark.parametrize("completion, answer, expected", [
    ("<think>a</think><answer>CABD</answer>", "CABD", 0.92),
    ("<think>a</think><answer>CABD</answer>", "ABCD", 0.02),
    ("<think>a</think> <answer>'B'</answer> ", "B", 0.92 - 0.02),  # quotes fail format, pass accuracy
    ("no tags at all: CABD", "CABD", 0.0),
    ("<answer>b</answer>", "B", 0.0),
])
def test_reward_table(completion, answer, expected):
    assert tpru_reward(completion, answer) == pytest.approx(expected)


# ------------------------------------------------------------------ parsing tables
ORDER4 = ordering.build(4)
NEXT = next_frame.build(2, 4, with_goal=True)


@pytest.mark.parametrize("raw, expected, well_formed", [
    ("<think>C first</think><answer>CABD</answer>", "CABD", True),
    ("<think>x</think>\n<answer>\n DCBA \n</answer>", "DCBA", True),
    ("< think >x</ think >< answer >BADC</ answer >", "BADC", True),
    ("<answer>ABCD</answer>", "ABCD", False),
    ("<think>thinking about A and B</think> CABD", "CABD", False),  # bare answer after the reasoning
    ('<think>x</think><answer>"BCDA"</answer>', "BCDA", False),
    ("<think>x</think><answer>C, A, B, D</answer>", "CABD", False),  # sloppy but unambiguous: flagged
    ("<think>x</think><answer>C-A-B-D</answer>", "CABD", False),
    ("<think>x</think><answer>C -> A -> B -> D</answer>", "CABD", False),
])
def test_parse_ordering_valid(raw, expected, well_formed):
    parsed = parse_response(raw, ORDER4.validate)
    assert parsed.answer == expected
    assert parsed.well_formed is well_formed


@pytest.mark.parametrize("raw, message", [
    ("", "no <answer>"),
    ("I think the order is C, A, B, D", "no <answer>"),
    ("<think>x</think><answer></answer>", "empty"),
    ("<think>x</think><answer>CAB</answer>", "expected 4 labels"),
    ("<think>x</think><answer>CABDA</answer>", "expected 4 labels"),
    ("<think>x</think><answer>CABE</answer>", "unknown label"),
    ("<think>x</think><answer>CABB</answer>", "repeated label"),
    ("<think>x</think><answer>C, A, B</answer>", "expected 4 labels"),
    ("<think>x</think><answer>the order is C A B D</answer>", "expected 4 labels"),
    ("<think>x</think><answer>cabd</answer>", "unknown label"),
])
def test_parse_ordering_invalid_keeps_raw(raw, message):
    with pytest.raises(ParseError, match=message) as info:
        parse_response(raw, ORDER4.validate)
    assert info.value.raw == raw


@pytest.mark.parametrize("raw, expected", [
    ("<think>x</think><answer>C</answer>", "C"),
    ("<think>x</think><answer>E</answer>", "E"),
    ("<answer> A </answer> trailing", "A"),
    ("<think>x</think><answer>(B)</answer>", "B"),
    ("<think>x</think><answer>E. None of the choices provided</answer>", "E"),
    ("<think>x</think><answer>C.</answer>", "C"),
])
def test_parse_choice_valid(raw, expected):
    assert parse_response(raw, NEXT.validate).answer == expected


@pytest.mark.parametrize("raw", [
    "<think>x</think><answer>F</answer>",
    "<think>x</think><answer>AB</answer>",
    "<think>x</think><answer>option C</answer>",
    "<think>x</think><answer>F. something</answer>",
    "<think>x</think>",
])
def test_parse_choice_invalid(raw):
    with pytest.raises(ParseError) as info:
        parse_response(raw, NEXT.validate)
    assert info.value.raw == raw


@pytest.mark.parametrize("answer", ["A or B", "A/B", "A / B", "A B C D E", "B. Actually C", "(A) or (C)"])
def test_an_answer_naming_several_options_is_a_parse_error(answer):
    """Issue 14: each of these once resolved to its first letter, and verify_step said ok on it."""
    raw = f"<think>x</think><answer>{answer}</answer>"
    with pytest.raises(ParseError, match="more than one option") as info:
        parse_response(raw, NEXT.validate)
    assert info.value.raw == raw


@pytest.mark.parametrize("raw, expected, prefix", [
    # the answer after the reasoning wins over a draft written inside it, and the draft is not "well formed"
    ("<think>maybe <answer>B</answer> no</think><answer>C</answer>", "C", "<think>maybe <answer>B</answer> no</think>"),
    ("<think>x<answer>B</answer></think><answer>B</answer>", "B", "<think>x<answer>B</answer></think>"),
    # only inside the reasoning (cut off): read leniently, scored after the text before it
    ("<think>the answer is <answer>D</answer>", "D", "<think>the answer is "),
    # a chat template that opened <think> itself: everything before the stray </think> is reasoning
    ("so <answer>A</answer> or not</think><answer>B</answer>", "B", "so <answer>A</answer> or not</think>"),
])
def test_an_answer_inside_the_reasoning_is_never_well_formed(raw, expected, prefix):
    from tpru_agent.tasks.answer import reasoning_prefix

    parsed = parse_response(raw, NEXT.validate)
    assert (parsed.answer, parsed.well_formed, parsed.prefix) == (expected, False, prefix)
    assert reasoning_prefix(raw) == prefix


@pytest.mark.parametrize("raw", [
    "<think>x</think><answer>B</answer><answer>C</answer>",
    "<think>x</think><answer>B</answer> wait, <answer>D</answer>",
    "<think>a <answer>B</answer> b <answer>C</answer>",
])
def test_different_answer_blocks_are_a_parse_error(raw):
    with pytest.raises(ParseError, match="2 different answers") as info:
        parse_response(raw, NEXT.validate)
    assert info.value.raw == raw


def test_a_repeated_identical_answer_block_is_accepted_but_not_well_formed():
    parsed = parse_response("<think>x</think><answer>B</answer><answer> B </answer>", NEXT.validate)
    assert (parsed.answer, parsed.well_formed) == ("B", False)


def test_normalize_tags_is_the_reference_regex_in_linear_time():
    import random
    import re
    import time

    from tpru_agent.tasks import normalize_tags

    rng = random.Random(0)
    alphabet = ["<", ">", "/", " ", "\t", "\n", "\u00a0", "a", "B"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert normalize_tags(text) == re.sub(r"\s*([<>/])\s*", r"\1", text), repr(text)
    started = time.perf_counter()
    for raw in (" " * 40_000, "<think>" + " " * 40_000 + "</think><answer> B </answer>"):
        normalize_tags(raw)
        try:
            parse_response(raw, NEXT.validate)
        except ParseError:
            pass
    assert time.perf_counter() - started < 1.0  # was 40 s: the regex retried the whitespace run per character


def test_extract_answer_first_block_wins():
    assert extract_answer("<answer>B</answer><answer>A</answer>") == "B"
    assert extract_answer("no answer") is None


# ------------------------------------------------------------------ question building
def test_ordering_question_layout():
    q = ordering.build(4, description="making coffee")
    assert q.problem.startswith("These photos show the process of making coffee.")
    assert q.problem.count(IMAGE) == q.n_images == 4
    assert len(q.answers()) == 24 and len(set(q.answers())) == 24
    assert q.validate("ABCD") is None and q.validate("ABC") is not None


@pytest.mark.parametrize("n", [1, 5])
def test_ordering_sizes_refused(n):
    with pytest.raises(ConfigError, match="2..4 frames"):
        ordering.build(n)


def test_ordering_mcq():
    q = ordering.build_mcq(4, ["ABCD", "DCBA", "BADC", "CABD"], none_position=1)
    assert q.answers() == ("A", "B", "C", "D", "E")
    assert q.none_letter == "B"
    assert q.option("C").value == "DCBA"
    assert q.problem.count(IMAGE) == 4
    with pytest.raises(ConfigError):
        ordering.build_mcq(4, ["ABCD", "ABCD"])
    with pytest.raises(ConfigError):
        ordering.build_mcq(4, ["ABCE"])


@pytest.mark.parametrize("none_position, letter", [(0, "A"), (2, "C"), (-1, "E"), (4, "E")])
def test_next_frame_none_position(none_position, letter):
    q = next_frame.build(2, 4, with_goal=True, none_position=none_position)
    assert q.none_letter == letter
    assert q.n_candidates == 4 and q.n_images == 7
    assert q.problem.count(IMAGE) == 7
    assert [o.value for o in q.options if o.value is not None] == [0, 1, 2, 3]


def test_next_frame_tpru_form_and_previous():
    q = next_frame.build(2, 4, with_goal=True)
    assert (q.context_steps, q.target_step) == ((1, 2, 4), 3)
    assert "Which option shows step 3?" in q.problem
    p = previous.build(3, 4, none_position=0)
    assert (p.context_steps, p.target_step, p.none_letter) == ((2, 3, 4), 1, "A")


@pytest.mark.parametrize("kwargs", [dict(n_history=0, n_candidates=4), dict(n_history=2, n_candidates=0),
                                    dict(n_history=2, n_candidates=9), dict(n_history=2, n_candidates=4,
                                                                            none_position=7)])
def test_choice_sizes_refused(kwargs):
    with pytest.raises(ConfigError):
        next_frame.build(**kwargs)


def test_with_answer_validates():
    q = next_frame.build(2, 4)
    assert q.with_answer("B").answer == "B"
    with pytest.raises(ConfigError):
        q.with_answer("Z")


@pytest.mark.parametrize("text, expected", [
    (None, ""), ("", ""), ("making tea", "These photos show the process of making tea."),
    ("These photos show the process of x", "These photos show the process of x."),
])
def test_describe(text, expected):
    assert describe(text) == expected


def test_continuation():
    assert continuation("CABD") == "<answer>CABD</answer>"


# ------------------------------------------------------------------ preamble and templates
def test_default_preamble_wraps_question():
    text = render_prompt(ORDER4.problem)
    assert ORDER4.problem in text
    assert text.count(IMAGE) == 4
    assert "<think>" in text and "<answer>" in text and "None of the choices provided" in text


@pytest.mark.parametrize("question", [ordering.build(2), ordering.build(3), ORDER4, NEXT, previous.build(3, 4),
                                      ordering.build_mcq(4, ["ABCD", "DCBA", "BADC"])])
def test_one_prompt_gives_at_most_one_example_answer(question):
    """Issue 13: the question said "for example DCBA" and the preamble "BDAC" in the same prompt."""
    import re

    text = render_prompt(question.problem)
    examples = set(re.findall(r"\b[A-J]{2,}\b", text)) - {o.value for o in question.options}
    assert len(examples) <= 1, examples
    if question.task == "ordering":
        assert examples == {"".join(reversed(question.labels))}
    assert "<answer>" in text and "</think>" in text


def test_reference_template_renders_as_the_authors_did(reference_dir):
    path = reference_dir / "tpru-format-prompt.jinja"
    text = render_prompt(NEXT.problem, path)
    source = path.read_text()
    head = source.split("{{")[0]
    tail = source.split("}}")[1]
    assert text == head + NEXT.problem.strip() + tail
    assert text.count(IMAGE) == 7


def test_template_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        render_prompt("x", tmp_path / "missing.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_text("no placeholder here")
    with pytest.raises(ConfigError, match="never uses"):
        render_prompt("x", bad)


def test_reasoning_prefix_tolerates_spaces_in_the_tag():
    from tpru_agent.tasks.answer import reasoning_prefix

    assert reasoning_prefix("<think>a</think>< answer >B</ answer >") == "<think>a</think>"
    assert reasoning_prefix("<think>a</think>") == "<think>a</think>"


def test_goal_is_labelled_final_step():
    q = next_frame.build(3, 2, with_goal=True)
    assert "Final step: <image>" in q.problem and "Step 5" not in q.problem
    assert "These are steps 1, 2, 3 and the final step. Which option shows step 4?" in q.problem


def test_template_that_does_not_render_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ content }} {{ other }}")
    with pytest.raises(ConfigError, match="does not render"):
        render_prompt("x", bad)
