"""The tpru-nano recipe: its settings are valid product settings, it never trains on held-out tasks, and the
fallback decision follows the measured figures."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("yaml", reason="the recipe reads YAML (extra finetune)")

from tpru_agent.finetune.train.config import resolve_config  # noqa: E402
from tpru_agent.finetune.train.recipes import nano  # noqa: E402
from tpru_agent.finetune.train.recipes.nano_ship import beats_classic, card  # noqa: E402


def test_recipe_stages_are_valid_finetune_configs(tmp_path):
    recipe = nano.load_recipe()
    for stage in ("sft", "grpo"):
        cfg = dict(recipe[stage], min_pixels=recipe["min_pixels"], max_pixels=recipe["max_pixels"])
        path = tmp_path / f"{stage}.yaml"
        import yaml

        path.write_text(yaml.safe_dump(cfg))
        resolved = resolve_config(path, {"data": str(tmp_path)})
        assert resolved.method == stage and resolved.max_pixels == recipe["max_pixels"]
    assert recipe["sft"]["sft_target"] == "answer"  # what fast mode scores


def test_training_tasks_exclude_every_heldout_task():
    recipe = nano.load_recipe()
    train = nano.ml45_train_tasks()
    assert len(train) == 45
    assert not set(train) & set(recipe["heldout"]["tasks"])
    assert set(recipe["heldout"]["tasks"]) == set(nano.ML45_TEST)


def _report(folder, ordering):
    folder.mkdir(parents=True)
    value, lo = ordering
    (folder / "report.json").write_text(json.dumps({"per_task": {"ordering": {
        "value": value, "correct": int(value * 100), "n": 100, "ci95": [lo, min(1.0, value + 0.1)]}}}))


@pytest.mark.parametrize("nano_fig, classic_fig, expected", [
    ((0.50, 0.40), (0.20, 0.12), True),    # 2.5x classic, interval above classic
    ((0.30, 0.20), (0.20, 0.12), False),   # not 2x classic
    ((0.15, 0.08), (0.05, 0.01), False),   # 3x classic but under the 0.2 floor
    ((0.45, 0.19), (0.20, 0.12), False),   # 2.25x but the interval reaches classic's estimate
])
def test_fallback_only_when_measured_better(tmp_path, nano_fig, classic_fig, expected):
    _report(tmp_path / "eval" / "nano-unseen-tasks", nano_fig)
    _report(tmp_path / "eval" / "classic-unseen-tasks", classic_fig)
    assert beats_classic(tmp_path) is expected


def test_no_reports_means_no_fallback_and_the_card_says_so(tmp_path):
    assert beats_classic(tmp_path) is False
    text = card(tmp_path, nano.load_recipe(), default=False)
    assert "not measured" in text and "CLI fallback when TPRU-3B is missing: **no**" in text


def test_ship_without_a_release_is_one_line_with_the_fix(tmp_path, capsys):
    assert nano.main(["--workdir", str(tmp_path), "--stages", "ship"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--stages release,eval,ship" in err and "Traceback" not in err
