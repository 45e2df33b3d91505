"""TRL-signature TPRU rewards: reference numbers, pairwise partial credit, conversational inputs, name resolution."""

from __future__ import annotations

import json

import pytest

from tpru_agent.errors import ConfigError
from tpru_agent.finetune.train import rewards
from tpru_agent.finetune.train.rewards import completion_text, pairwise_agreement, partial_reward, resolve_rewards


def _chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_tpru_reward_matches_every_reference_case_plain_and_conversational(reference_dir):
    cases = [json.loads(line) for line in (reference_dir / "tpru-reward-cases.jsonl").read_text().splitlines() if line]
    assert len(cases) >= 10
    answers = [c["answer"] for c in cases]
    want = [c["overall"] for c in cases]
    assert rewards.tpru([c["completion"] for c in cases], answers) == pytest.approx(want, abs=1e-9)
    assert rewards.tpru([_chat(c["completion"]) for c in cases], answers) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("completion, answer, overall", [
    ("<think>x</think><answer>`CABD`</answer>", "CABD", 0.0),        # backticks are not stripped
    ("<think>x</think><answer>\" CABD \"</answer>", "CABD", 0.0),     # spaces inside the quotes stay
    ("<think>x</think><answer>'CABD'</answer>", "CABD", 0.9),         # quotes are stripped; format wants [A-Z]+
    ("<think>x</think><answer> CABD </answer>", "CABD", 0.92),
    ("<think>x</think><answer>CABD</answer>", " CABD", 0.02),        # the ground truth is compared as given
    ("<think>x</think><answer>CABD</answer>", "CABD\n", 0.02),
    ("<think>x</think><answer></answer>", "", 0.9),                  # no format credit, but "" == "" (authors)
])
def test_training_reward_follows_the_authors_on_wrapped_answers_and_spaced_truths(completion, answer, overall):
    """The issue's differing cases: the authors' reward gives these numbers, so training gives them too."""
    assert rewards.tpru([completion], [answer]) == pytest.approx([overall], abs=1e-9)
    assert rewards.reference_scores(completion, answer)["overall"] == pytest.approx(overall, abs=1e-9)


def test_reference_scores_report_format_and_accuracy_like_the_reference_file(reference_dir):
    cases = [json.loads(line) for line in (reference_dir / "tpru-reward-cases.jsonl").read_text().splitlines() if line]
    for case in cases:
        got = rewards.reference_scores(case["completion"], case["answer"])
        assert got == pytest.approx({k: case[k] for k in ("overall", "format", "accuracy")}, abs=1e-9), case


@pytest.mark.parametrize("completion, text", [
    ("<answer>A</answer>", "<answer>A</answer>"),
    ([{"role": "assistant", "content": "plain"}], "plain"),
    ({"role": "assistant", "content": "one message"}, "one message"),
    ([{"role": "assistant", "content": [{"type": "text", "text": "<think>a"}, {"type": "text", "text": "</think>"}]}],
     "<think>a</think>"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "last wins"}], "last wins"),
    ([], ""),
])
def test_completion_text_reads_every_trl_shape(completion, text):
    assert completion_text(completion) == text


def test_completion_text_rejects_unknown_types():
    with pytest.raises(ConfigError, match="cannot read a completion"):
        completion_text(42)


@pytest.mark.parametrize("got, answer, want", [
    ("CABD", "CABD", 1.0),
    ("DBAC", "CABD", 0.0),          # reversed: every pair flipped
    ("CBAD", "CABD", 5 / 6),        # one adjacent swap
    ("ACBD", "CABD", 5 / 6),
    ("BACD", "CABD", 3 / 6),        # C moved from first to third: pairs CA, CB flipped... and AB flipped
    ("ABC", "ACB", 2 / 3),          # three labels
    ("CABE", "CABD", 0.0),          # not a permutation of the same labels
    ("CAB", "CABD", 0.0),           # too short
    ("CCBD", "CABD", 0.0),          # repeated label
    (None, "CABD", 0.0),            # no answer block
    ("B", "B", 1.0),                # letters: exact match only
    ("C", "B", 0.0),
])
def test_pairwise_agreement_table(got, answer, want):
    assert pairwise_agreement(got, answer) == pytest.approx(want)


@pytest.mark.parametrize("completion, answer, want", [
    ("<think>x</think><answer>CABD</answer>", "CABD", 0.92),
    ("<think>x</think><answer>CBAD</answer>", "CABD", 0.9 * 5 / 6 + 0.02),
    ("<answer>CBAD</answer>", "CABD", 0.9 * 5 / 6),               # no think block: no format credit
    ("<think>x</think><answer>DBAC</answer>", "CABD", 0.02),
    ("<think>x</think><answer>A</answer>", "B", 0.02),             # letters stay exact match
    ("<think>x</think><answer>B</answer>", "B", 0.92),
    ("no tags at all CABD", "CABD", 0.0),
])
def test_partial_reward_table(completion, answer, want):
    assert partial_reward(completion, answer) == pytest.approx(want, abs=1e-9)
    assert rewards.tpru_partial([_chat(completion)], [answer]) == pytest.approx([want], abs=1e-9)


def test_partial_reward_equals_reference_reward_on_exact_and_letter_answers(reference_dir):
    cases = [json.loads(line) for line in (reference_dir / "tpru-reward-cases.jsonl").read_text().splitlines() if line]
    for case in cases:
        partial = partial_reward(case["completion"], case["answer"])
        assert partial >= case["overall"] - 1e-9  # partial credit never takes reward away
        if len(case["answer"].strip()) == 1 or case["accuracy"] == 1.0:
            assert partial == pytest.approx(case["overall"], abs=1e-9)


def test_rewards_report_accuracy_and_format_through_trl_log_metric():
    logged = {}
    completions = ["<think>x</think><answer>CABD</answer>", "<answer>CABD</answer>",
                   "<think>x</think><answer>ABCD</answer>", "junk"]
    out = rewards.tpru(completions, ["CABD"] * 4, log_metric=lambda k, v: logged.__setitem__(k, v))
    assert out == pytest.approx([0.92, 0.9, 0.02, 0.0])
    assert logged == {"accuracy": pytest.approx(0.5), "format": pytest.approx(0.5)}


@pytest.mark.parametrize("completion, answer, want", [
    ("CABD", "CABD", 1.0),
    ("C A x y", "CABD", 0.5),
    ("hello", "CABD", 0.0),
    ("", "CABD", 0.0),
    ("A. B", "C", 2 / 3),            # a letter answer counts every option label A-D
])
def test_label_density_is_dense_and_bounded(completion, answer, want):
    assert rewards.label_density([completion], [answer]) == pytest.approx([want])


def test_rewards_reject_mismatched_lengths():
    with pytest.raises(ConfigError, match="2 completions but 1 answers"):
        rewards.tpru(["a", "b"], ["A"])


def test_resolve_rewards_by_name_and_import_path():
    assert resolve_rewards(["tpru", "tpru_partial"]) == [rewards.tpru, rewards.tpru_partial]
    assert resolve_rewards(["tpru_agent.finetune.train.rewards:label_density"]) == [rewards.label_density]


@pytest.mark.parametrize("names, message", [
    (["tpru_parital"], "Did you mean 'tpru_partial'"),
    (["nosuchmodule.xyz:f"], "cannot be loaded"),
    (["tpru_agent.finetune.train.rewards:nothing"], "cannot be loaded"),
    (["tpru_agent.finetune.train.rewards:REWARDS"], "not callable"),
    ([], "at least one reward"),
])
def test_resolve_rewards_errors_name_the_fix(names, message):
    with pytest.raises(ConfigError, match=message):
        resolve_rewards(names)
