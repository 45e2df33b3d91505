"""GRPO / SFT on the tiny Qwen2.5-VL with multi-image prompts: full, LoRA, QLoRA, the batch guard, SIGTERM + resume.

Every run uses 4-image ordering prompts (mixed with 3-image ordering and 7-image next-frame prompts), the real
TRL trainers and the real model class on CPU. A random model scores 0 on the exact-match TPRU reward, so the runs
add the dense ``label_density`` reward to get nonzero advantages and gradients.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

from PIL import Image, ImageDraw  # noqa: E402

from tpru_agent.finetune.train.config import resolve_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bar_frame(step: int, steps: int = 4, hue: int = 0, size: int = 112) -> Image.Image:
    """A bar that grows with time: frame ``step`` of a ``steps``-step procedure."""
    image = Image.new("RGB", (size, size), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    height = int(size * (step + 1) / (steps + 1))
    draw.rectangle([16, size - height, size - 16, size - 4], fill=(200, 60 + hue, 40 + 2 * step * 20))
    return image


def write_dataset(root: Path, *, n_train: int = 12, n_test: int = 4, seed: int = 0) -> Path:
    """A TPRU-layout dataset: 4- and 3-frame ordering and 7-image next-frame questions over growing bars."""
    from tpru_agent.finetune.data.tpru_format import TPRURow, encode_png, write_parquet
    from tpru_agent.tasks import next_frame, ordering

    rng = random.Random(seed)

    def rows(n: int, tag: str) -> list:
        out = []
        for i in range(n):
            kind = ("ordering4", "ordering3", "next")[i % 3]
            if kind.startswith("ordering"):
                k = int(kind[-1])
                order = list(range(k))
                rng.shuffle(order)
                frames = [bar_frame(t, k, hue=10 * i) for t in order]
                answer = "".join("ABCD"[order.index(t)] for t in range(k))
                q = ordering.build(k)
            else:
                q = next_frame.build(2, 4, with_goal=True, none_position=-1)
                candidates = [bar_frame(2, hue=10 * i), bar_frame(0, hue=90), bar_frame(3, hue=120),
                              bar_frame(1, hue=150)]
                rng.shuffle(candidates)
                truth = next(j for j, c in enumerate(candidates) if c.tobytes() == bar_frame(2, hue=10 * i).tobytes())
                frames = [bar_frame(0, hue=10 * i), bar_frame(1, hue=10 * i), bar_frame(3, hue=10 * i)] + candidates
                answer = "ABCD"[truth]
                kind = "next"
            out.append(TPRURow(q.problem, tuple(encode_png(f) for f in frames), answer,
                               task="ordering" if kind.startswith("ordering") else "next", domain="synthetic",
                               episode_id=f"{tag}-{i}"))
        return out

    write_parquet(rows(n_train, "train"), root / "train" / "part-0.parquet")
    write_parquet(rows(n_test, "test"), root / "test" / "part-0.parquet")
    (root / "manifest.json").write_text(json.dumps({"builder": "tests", "seed": seed}))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tpru-data"))


def tiny_config(tiny: Path, data: Path, out: Path, **overrides):
    """The smallest run that still exercises everything: 1 prompt x 4 rollouts per step, 16-token completions."""
    values = dict(base=str(tiny), data=str(data), output_dir=str(out), num_generations=4,
                  per_device_train_batch_size=4, prompts_per_rollout=1, prompts_per_update=1, max_completion_length=16,
                  max_steps=2, save_steps=1, learning_rate=1e-3, rewards=["tpru", "label_density"], eval_samples=2,
                  eval_max_new_tokens=8, device="cpu", progress=False, lora_r=4, lora_alpha=8, sft_batch_size=2,
                  data_cache_dir=str(out.parent / "datasets-cache"))
    values.update(overrides)
    return resolve_config(overrides=values)


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def changed_keys(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not bool((a[k] == b[k]).all())}


#: Saved checkpoints use the Hub key layout (``visual.*``, ``model.layers.*``); the in-memory one nests them.
VISION_KEY = re.compile(r"^(model\.)?visual\.")
LM_PROJECTION_KEY = re.compile(r"^model\.(language_model\.)?layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\."
                               r"(weight|bias)$")


def records(path: Path, key: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if key is None or key in r]


def answers(final: Path, frames) -> None:
    """The weights load in the SDK and answer an ordering question."""
    from tpru_agent import TPRU

    result = TPRU(final).order_frames(frames, mode="fast")
    assert sorted(result.order) == [0, 1, 2, 3]
    assert 0.0 < result.confidence <= 1.0 and result.engine == "hf"


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


# ----------------------------------------------------------------------------------------------- trains what it says
def test_a_split_smaller_than_one_rollout_is_fitted_and_trains(tiny_checkpoint, tmp_path, caplog):
    """Paper batch sizes (256 prompts per rollout, 128 per update) on 6 rows: fitted with a warning, steps > 0."""
    from tpru_agent.finetune.train.job import train

    data = write_dataset(tmp_path / "d", n_train=6, n_test=1)
    cfg = tiny_config(tiny_checkpoint, data, tmp_path / "run", num_generations=2, per_device_train_batch_size=2,
                      prompts_per_rollout=256, prompts_per_update=128, max_steps=-1, num_train_epochs=1.0,
                      beta=0.0, eval_samples=0, save_steps=100, max_completion_length=4)
    with caplog.at_level("WARNING"):
        result = train(cfg)
    assert result.status == "finished" and result.steps["grpo"] >= 1
    assert "fewer than one rollout" in caplog.text and "prompts_per_rollout 256 -> 6" in caplog.text
    assert "prompts_per_rollout 256 -> 6" in (result.final / "README.md").read_text()


def test_fit_rollout_refuses_with_the_fix_when_no_update_fits():
    """1 row x 5 generations cannot fill micro-batches of 10 completions: a typed error names the setting."""
    from tpru_agent.errors import ConfigError
    from tpru_agent.finetune.train.config import FinetuneConfig
    from tpru_agent.finetune.train.grpo import fit_rollout

    cfg = FinetuneConfig(data="d", per_device_train_batch_size=10)
    assert fit_rollout(cfg, 300) == (cfg, None)                        # a full rollout: unchanged
    fitted, note = fit_rollout(cfg, 42)
    assert (fitted.prompts_per_rollout, fitted.prompts_per_update) == (42, 42) and "42" in note
    fitted, _ = fit_rollout(cfg, 41)                                   # 41 x 5 is odd: the update drops to 40
    assert (fitted.prompts_per_rollout, fitted.prompts_per_update) == (40, 40)
    with pytest.raises(ConfigError, match="set per_device_train_batch_size to 5"):
        fit_rollout(cfg, 1)


def test_max_steps_bounds_the_sft_stage_too(tiny_checkpoint, dataset, tmp_path):
    from tpru_agent.finetune.train.job import train

    cfg = tiny_config(tiny_checkpoint, dataset, tmp_path / "run", method="sft", max_steps=1, sft_batch_size=2,
                      eval_samples=0)
    assert train(cfg).steps == {"sft": 1}   # 12 rows / batch 2 would be 6 steps per epoch


def test_pickle_weights_are_refused_even_beside_other_safetensors(tiny_checkpoint, dataset, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tpru_agent.errors import ModelNotFoundError
    from tpru_agent.finetune.train.job import train

    folder = tmp_path / "mixed"
    shutil.copytree(tiny_checkpoint, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    save_file({"x": torch.zeros(1)}, folder / "extra.safetensors")
    cfg = tiny_config(folder, dataset, tmp_path / "run", max_steps=1, eval_samples=0)
    with pytest.raises(ModelNotFoundError, match=r"\['pytorch_model.bin'\]: pickle weights are refused"):
        train(cfg)


def test_overlong_prompts_are_left_out_and_counted(tiny_checkpoint, dataset):
    """Token counts include the image tokens; the 7-image prompts are the longest and go first."""
    from tpru_agent.finetune.train.inputs import load_split, prompt_lengths
    from tpru_agent.finetune.train.modeling import load_processor
    from tpru_agent.sizing import PixelBudget

    cfg = tiny_config(tiny_checkpoint, dataset, dataset.parent / "unused")
    processor = load_processor(tiny_checkpoint, cfg)
    full = load_split(dataset, "train", cache_dir=cfg.data_cache_dir)
    lengths = prompt_lengths(full, processor, template=None, budget=PixelBudget())
    real = [len(processor.apply_chat_template(full[i]["prompt"], tokenize=True, add_generation_prompt=True,
                                              images=full[i]["images"], return_dict=True)["input_ids"][0])
            for i in range(3)]
    assert lengths[:3] == real                       # exactly the prompt the model sees
    limit = sorted(lengths)[-1] - 1                  # drops the longest prompts only
    report: dict = {}
    kept = load_split(dataset, "train", cache_dir=cfg.data_cache_dir, processor=processor,
                      max_prompt_length=limit, report=report)
    dropped = sum(n > limit for n in lengths)
    assert len(kept) == len(full) - dropped and report["overlong"]["dropped"] == dropped >= 1
    assert all(kept[i]["row_id"] in [j for j, n in enumerate(lengths) if n <= limit] for i in range(len(kept)))


def test_generation_is_chunked_and_splits_multimodal_fields_per_row(tiny_checkpoint, tmp_path):
    """A rollout of 4 prompts x 2 generations, generated 2 completions per call: every batch check still passes."""
    from tpru_agent.finetune.train.grpo import build_grpo_trainer
    from tpru_agent.finetune.train.inputs import load_split
    from tpru_agent.finetune.train.modeling import load_model, load_processor

    data = write_dataset(tmp_path / "d", n_train=4, n_test=1)
    cfg = tiny_config(tiny_checkpoint, data, tmp_path / "run", num_generations=2, prompts_per_rollout=4,
                      prompts_per_update=4, per_device_train_batch_size=8, beta=0.0, max_steps=1,
                      generation_chunk_size=2)
    processor = load_processor(tiny_checkpoint, cfg)
    trainer = build_grpo_trainer(cfg, load_model(tiny_checkpoint, cfg), processor,
                                 load_split(data, "train", cache_dir=cfg.data_cache_dir), output_dir=tmp_path / "o")
    calls = []
    original = trainer.model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    trainer.model.generate = counting
    trainer.train()
    assert calls == [2, 2, 2, 2]                                 # 8 completions in chunks of 2
    summary = trainer.last_batch_summary
    assert sorted(summary["images_per_row"]) == [3, 3, 4, 4, 4, 4, 7, 7]
    assert summary["image_tokens_per_row"] == summary["features_per_row"]


def test_rows_are_decoded_once_per_rollout_not_once_per_fetch(tiny_checkpoint, tmp_path, monkeypatch):
    """Issue 13: TRL's loader yields the whole rollout per micro-step (its sampler repeats it steps_per_generation
    times) and the Trainer fetches gradient_accumulation_steps of them per update, so every row was decoded
    GAS x steps_per_generation x num_generations times (64 x 512 rows per update at the paper's sizes: OOM at
    24 GB). Here 4 prompts x 2 generations, updates of 2 prompts, micro-batch 2 (GAS 2, steps_per_generation 4):
    TRL's stock loader decodes 32 rows for 2 updates; ours decodes the 4 rows once, and trains the same weights."""
    import datasets
    import torch
    import transformers
    from trl import GRPOTrainer

    from tpru_agent.finetune.train.grpo import TPRUGRPOTrainer, build_grpo_trainer
    from tpru_agent.finetune.train.inputs import load_split
    from tpru_agent.finetune.train.modeling import load_model, load_processor

    data = write_dataset(tmp_path / "d", n_train=4, n_test=1)
    cfg = tiny_config(tiny_checkpoint, data, tmp_path / "run", num_generations=2, prompts_per_rollout=4,
                      prompts_per_update=2, per_device_train_batch_size=2, beta=0.0, max_steps=2,
                      max_completion_length=8)
    assert cfg.gradient_accumulation_steps == 2 and cfg.generation_batch_size == 8
    decoded = []
    original = datasets.Dataset.__getitems__

    def counting(self, keys):
        decoded.extend(keys)
        return original(self, keys)

    def trained(stock: bool, out: str):
        if stock:
            monkeypatch.setattr(TPRUGRPOTrainer, "get_train_dataloader", GRPOTrainer.get_train_dataloader)
        else:
            monkeypatch.undo()
        monkeypatch.setattr(datasets.Dataset, "__getitems__", counting)
        transformers.set_seed(cfg.seed)
        trainer = build_grpo_trainer(cfg, load_model(tiny_checkpoint, cfg), load_processor(tiny_checkpoint, cfg),
                                     load_split(data, "train", cache_dir=cfg.data_cache_dir),
                                     output_dir=tmp_path / out)
        decoded.clear()
        trainer.train()
        assert trainer.state.global_step == 2
        return len(decoded), {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    stock_count, stock_weights = trained(True, "stock")
    ours_count, ours_weights = trained(False, "ours")
    assert stock_count == 2 * 2 * 8            # 2 updates x GAS 2 fetches x 8 rows (the rollout), each decoded
    assert ours_count == 4                     # the rollout's 4 distinct prompts, once
    assert all(torch.equal(stock_weights[k], ours_weights[k]) for k in stock_weights)


# ----------------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_resume_equals_the_uninterrupted_run(tiny_checkpoint, dataset, tmp_path, method):
    """Stop after step 2 (checkpoint-2 kept), resume to 4: every logged loss and reward, and the final weights,
    equal the uninterrupted run's. Before, the checkpoint's weights were silently not loaded (key layout)."""
    import shutil

    from tpru_agent.finetune.train.job import train

    def run(out):
        return tiny_config(tiny_checkpoint, dataset, out, method=method, max_steps=4, save_steps=2, beta=0.01,
                           eval_samples=0, max_completion_length=8, sft_learning_rate=1e-3)

    whole = train(run(tmp_path / "whole"))
    cut = tmp_path / "cut"
    train(run(cut))
    shutil.rmtree(cut / method / "checkpoint-4")
    shutil.rmtree(cut / "final")
    (cut / method / "done.json").unlink()
    resumed = train(run(cut), resume=True)
    assert resumed.steps == whole.steps == {method: 4}

    def curve(folder):
        keys = ("loss", "reward", "grad_norm")
        return [[r["step"]] + [r[k] for k in keys if k in r] for r in records(folder / "metrics.jsonl", "loss")]

    want, got = curve(tmp_path / "whole"), curve(cut)
    assert [r[0] for r in got] == [1, 2, 3, 4]
    for w, g in zip(want, got):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-7)
    a, b = tensors(whole.final), tensors(resumed.final)
    assert all(bool((a[k] - b[k]).abs().max() <= 1e-6) for k in a)


def test_resume_refuses_a_checkpoint_of_another_model():
    from tpru_agent.finetune.train.resume import ResumeError, match_keys

    with pytest.raises(ResumeError, match="matches 0 parameters"):
        match_keys(["model.layers.0.other.weight"], ["model.language_model.layers.0.mlp.weight"])
