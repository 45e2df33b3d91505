"""GRPO / SFT on the tiny Qwen2.5-VL with multi-image prompts: full, LoRA, QLoRA, the batch guard, SIGTERM + resume.

Every run uses 4-image ordering prompts (mixed with 3-image ordering and 7-image next-frame prompts), the real
TRL trainers and the real model class on CPU. A random model scores 0 on the exact-match TPRU reward, so the runs
add the dense ``label_density`` reward to get nonzero advantages and gradients. What a run refuses or bounds, and
exact resume, are in test_finetune_guards.py; the shared dataset and config helpers in finetune_runs.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

from finetune_runs import (  # noqa: E402
    LM_PROJECTION_KEY,
    REPO,
    VISION_KEY,
    answers,
    changed_keys,
    records,
    tensors,
    tiny_config,
    write_dataset,
)

from tpru_agent.finetune.train.config import resolve_config  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tpru-data"))


# ----------------------------------------------------------------------------------------------- full fine-tune
@pytest.fixture(scope="module")
def full_run(tiny_checkpoint, dataset, tmp_path_factory):
    """GRPO, full fine-tuning with the KL term (the paper's beta), 4 steps, a checkpoint every 2."""
    from tpru_agent.finetune.train.job import train

    out = tmp_path_factory.mktemp("full") / "run"
    cfg = tiny_config(tiny_checkpoint, dataset, out, max_steps=4, save_steps=2, beta=0.01)
    result = train(cfg)
    return cfg, result


def test_full_grpo_changes_the_weights_with_real_gradients(full_run, tiny_checkpoint):
    cfg, result = full_run
    assert result.status == "finished" and result.steps == {"grpo": 4}
    changed = changed_keys(tensors(result.final), tensors(tiny_checkpoint))
    assert any(VISION_KEY.match(k) for k in changed)      # the vision tower trains (paper: not frozen)
    assert any(LM_PROJECTION_KEY.match(k) for k in changed)
    steps = records(Path(cfg.output_dir) / "metrics.jsonl", "grad_norm")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert any(r["grad_norm"] > 0 and r["reward_std"] > 0 for r in steps)  # not only weight decay
    assert any(r["kl"] > 0 for r in steps)                 # the reference model is in the loss
    assert all("accuracy" in r and "format" in r for r in steps)


def test_full_grpo_writes_checkpoints_curves_config_and_card(full_run):
    cfg, result = full_run
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in (out / "grpo").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "grpo" / "checkpoint-4" / "trainer_state.json").is_file()
    assert resolve_config(out / "config.yaml") == cfg
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    card = (result.final / "README.md").read_text()
    assert str(cfg.base) in card and "grpo 4" in card and "Held-out accuracy" in card and '"builder": "tests"' in card
    assert result.evaluation["n"] == 2 and 0.0 <= result.evaluation["accuracy"] <= 1.0
    assert not list(result.final.glob("*.bin"))  # safetensors only
    provenance = json.loads((result.final / "tpru_finetune.json").read_text())
    assert provenance["weights"] == "full" and provenance["steps"] == {"grpo": 4}


def test_every_rollout_batch_passed_the_multimodal_check(full_run, dataset):
    """The batches the trainer really built: one image-token block per image, features == tokens, 4+ images."""
    cfg, _ = full_run
    rollouts = records(Path(cfg.output_dir) / "rollouts.jsonl")
    assert [r["step"] for r in rollouts] == [0, 1, 2, 3]
    from tpru_agent.finetune.data.tpru_format import read_parquet

    rows = list(read_parquet(dataset / "train"))
    for r in rollouts:
        [row_id] = r["rows"]
        n_images = len(rows[row_id].images)
        assert len(r["image_tokens"]) == cfg.num_generations
        assert r["image_tokens"] == r["features"]              # image tokens in the prompt == image features
        assert r["image_tokens"][0] % n_images == 0 and r["image_tokens"][0] >= 4 * n_images
    assert any(len(rows[r["rows"][0]].images) >= 4 for r in rollouts)


def test_full_grpo_weights_load_in_the_sdk_and_answer(full_run, frames4):
    answers(full_run[1].final, frames4)


def test_a_finished_run_is_not_overwritten_without_resume(full_run):
    from tpru_agent.errors import ConfigError
    from tpru_agent.finetune.train.job import train

    cfg, _ = full_run
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)
    again = train(cfg, resume=True)  # a finished run resumes as a no-op
    assert again.status == "finished" and again.steps == {"grpo": 4}


def test_batch_guard_stops_right_padded_prompts(tiny_checkpoint, tmp_path):
    """Prompts of different lengths in one rollout with a right-padding processor: caught before training."""
    from tpru_agent.finetune.train.grpo import BatchCheckError, build_grpo_trainer
    from tpru_agent.finetune.train.inputs import load_split
    from tpru_agent.finetune.train.modeling import load_model, load_processor

    data = write_dataset(tmp_path / "d", n_train=2, n_test=1)   # a 4-frame and a 3-frame ordering question
    cfg = tiny_config(tiny_checkpoint, data, tmp_path / "run", num_generations=2, prompts_per_rollout=2,
                      prompts_per_update=2, per_device_train_batch_size=4, beta=0.0, max_steps=1)
    processor = load_processor(tiny_checkpoint, cfg)
    processor.tokenizer.padding_side = "right"               # the known failure mode
    trainer = build_grpo_trainer(cfg, load_model(tiny_checkpoint, cfg), processor,
                                 load_split(data, "train", cache_dir=cfg.data_cache_dir), output_dir=tmp_path / "o")
    with pytest.raises(BatchCheckError, match="mm_token_type_ids do not mark the image tokens"):
        trainer.train()
    processor.tokenizer.padding_side = "left"
    trainer = build_grpo_trainer(cfg, load_model(tiny_checkpoint, cfg), processor,
                                 load_split(data, "train", cache_dir=cfg.data_cache_dir), output_dir=tmp_path / "o2")
    trainer.train()
    summary = trainer.last_batch_summary
    assert sorted(summary["images_per_row"]) == [3, 3, 4, 4]   # both prompts, 2 rollouts each
    assert summary["image_tokens_per_row"] == summary["features_per_row"]
    assert len(set(summary["image_tokens_per_row"])) == 2      # different lengths: padding was exercised


# ----------------------------------------------------------------------------------------------- PEFT
def test_lora_trains_only_the_language_model_and_merges(tiny_checkpoint, dataset, tmp_path, frames4):
    from tpru_agent.finetune.train.job import train

    cfg = tiny_config(tiny_checkpoint, dataset, tmp_path / "run", peft="lora", beta=0.0, max_steps=3)
    result = train(cfg)
    assert result.status == "finished"
    ckpt = tmp_path / "run" / "grpo" / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    changed = changed_keys(tensors(result.final), tensors(tiny_checkpoint))
    assert changed, "LoRA merged into the base must change the weights"
    assert all(LM_PROJECTION_KEY.match(k) for k in changed), changed
    assert not any(VISION_KEY.match(k) for k in changed)  # the vision MLP's gate/up/down_proj are left alone
    answers(result.final, frames4)


@pytest.mark.slow
def test_qlora_trains_on_a_4bit_base_and_merges_into_full_weights(tiny_checkpoint, dataset, tmp_path, frames4):
    from tpru_agent.finetune.train.job import train

    cfg = tiny_config(tiny_checkpoint, dataset, tmp_path / "run", peft="qlora", beta=0.0, max_steps=2, eval_samples=0)
    result = train(cfg)
    steps = records(tmp_path / "run" / "metrics.jsonl", "grad_norm")
    assert any(r["grad_norm"] > 0 for r in steps)
    base = tensors(tiny_checkpoint)
    final = tensors(result.final)
    assert final.keys() == base.keys()                    # plain full-precision weights, no 4-bit leftovers
    assert all(final[k].dtype == base[k].dtype for k in base)
    changed = changed_keys(final, base)
    assert changed and all(LM_PROJECTION_KEY.match(k) for k in changed)
    answers(result.final, frames4)


@pytest.mark.slow
def test_unmerged_adapter_is_saved_with_processor_and_note(tiny_checkpoint, dataset, tmp_path, frames4):
    from tpru_agent.finetune.train.job import train

    cfg = tiny_config(tiny_checkpoint, dataset, tmp_path / "run", peft="lora", merge=False, beta=0.0, max_steps=1,
                      eval_samples=0)
    final = train(cfg).final
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_checkpoint)
    assert (final / "adapter_model.safetensors").is_file() and (final / "chat_template.jinja").is_file()
    assert "LoRA adapter" in (final / "README.md").read_text()
    answers(final, frames4)  # the SDK loads the base named by the adapter and applies it


# ----------------------------------------------------------------------------------------------- SFT warm-up
@pytest.mark.slow
def test_sft_then_grpo_runs_both_stages_and_hands_over_weights(tiny_checkpoint, dataset, tmp_path, frames4):
    from tpru_agent.finetune.train.job import train

    cfg = tiny_config(tiny_checkpoint, dataset, tmp_path / "run", method="sft+grpo", beta=0.0, max_steps=2,
                      sft_max_steps=2, sft_learning_rate=1e-3, eval_samples=0)
    result = train(cfg)
    assert result.steps == {"sft": 2, "grpo": 2}
    warm = tmp_path / "run" / "sft" / "model"
    assert changed_keys(tensors(warm), tensors(tiny_checkpoint))
    assert changed_keys(tensors(result.final), tensors(warm))
    stages = {r["stage"] for r in records(tmp_path / "run" / "metrics.jsonl", "loss")}
    assert stages == {"sft", "grpo"}
    assert json.loads((tmp_path / "run" / "final" / "tpru_finetune.json").read_text())["base_path"] == str(warm)
    answers(result.final, frames4)


# ----------------------------------------------------------------------------------------------- faults
def _launch(config: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "tpru_agent.finetune.train.job", "--config", str(config), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues_the_same_steps_and_data(full_run, tmp_path):
    """A real subprocess killed mid-run (SIGTERM), then resumed: same step count and data order as uninterrupted."""
    reference_cfg, _ = full_run
    out = tmp_path / "run"
    cfg = resolve_config(overrides={**reference_cfg.to_dict(), "output_dir": str(out)})
    config = cfg.save(tmp_path / "config.yaml")
    proc = _launch(config)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and records(metrics, "grad_norm"):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "resume with --resume" in err
    saved = sorted((out / "grpo").glob("checkpoint-*"))
    assert saved and not (out / "final").exists()
    stopped_at = int(saved[-1].name.split("-")[1])
    assert 1 <= stopped_at < cfg.max_steps

    proc = _launch(config, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    state = json.loads((out / "grpo" / f"checkpoint-{cfg.max_steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == cfg.max_steps
    assert [r["step"] for r in records(metrics, "grad_norm")] == list(range(1, cfg.max_steps + 1))
    ref_rows = [r["rows"] for r in records(Path(reference_cfg.output_dir) / "rollouts.jsonl")]
    assert [r["rows"] for r in records(out / "rollouts.jsonl")] == ref_rows   # same data, same order
    assert (out / "final" / "model.safetensors").is_file()


def test_full_fine_tuning_keeps_fp32_master_weights_and_ships_bf16(tiny_checkpoint, tmp_path):
    """lr 1e-6 updates vanish in bf16 weights: full fine-tuning trains fp32 masters; the release is cast to bf16."""
    import shutil

    import torch

    from tpru_agent.finetune.train.config import FinetuneConfig
    from tpru_agent.finetune.train.grpo import grpo_args
    from tpru_agent.finetune.train.modeling import cast_checkpoint, train_dtype

    gpu_like = FinetuneConfig(data="d", bf16=True)
    assert train_dtype(gpu_like) == torch.float32
    assert train_dtype(FinetuneConfig(data="d", bf16=True, peft="lora")) == torch.bfloat16
    weight = torch.tensor([0.02], dtype=torch.bfloat16)
    assert bool(weight + 1e-6 == weight)  # why: the update is below bf16 resolution
    args = grpo_args(FinetuneConfig(data="d", bf16=True, device="cpu"), tmp_path / "o")
    assert args.model_init_kwargs == {"dtype": "bfloat16", "use_safetensors": True}  # the frozen reference only
    no_kl = FinetuneConfig(data="d", bf16=True, device="cpu", beta=0.0)
    assert grpo_args(no_kl, tmp_path / "o").model_init_kwargs == {"use_safetensors": True}

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    cast_checkpoint(folder, "bfloat16")
    assert {t.dtype for t in tensors(folder).values()} == {torch.bfloat16}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
