"""Fine-tuning trains what it says: a split smaller than a rollout is fitted, max_steps bounds every stage, pickle
weights are refused, overlong prompts are left out, generation is chunked, rows are decoded once per rollout, and a
resumed run equals the uninterrupted one. Helpers: finetune_runs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

from finetune_runs import records, tensors, tiny_config, write_dataset  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tpru-data"))


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
