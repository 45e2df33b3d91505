"""TRL ``GRPOTrainer`` wiring for multi-image TPRU prompts, with a guard on the batches it builds.

TRL's GRPO on multi-image Qwen2.5-VL has a history of silent input corruption: image features that do not
match the image tokens in the prompt, right-padded prompts under left-padded generation (the processor's own
padding then misaligns ``mm_token_type_ids`` with the prompt ids), ``image_grid_thw`` rows out of step with the
images. :class:`TPRUGRPOTrainer` checks every rollout batch the trainer builds (:func:`check_multimodal_batch`)
and stops with :class:`BatchCheckError` instead of training on corrupted inputs; the check costs a few tensor
comparisons per rollout. It also reports which dataset rows each rollout used (``on_rollout``), so a resumed run
can be shown to see the same data order.

Rows are decoded once per rollout, not once per fetch. TRL's train loader yields a whole rollout
(``generation_batch_size`` rows) per micro-step and its ``RepeatSampler`` repeats that rollout
``steps_per_generation x num_iterations`` times; the HF ``Trainer`` fetches ``gradient_accumulation_steps`` of them
before training on any, and TRL generates from the first and ignores the rest. At the paper's 256 / 128 prompts x
2 generations, micro-batch 4, that was 64 x 512 decoded rows (4-7 frames each) held per optimizer step (issue 13:
OOM at 24 GB before the first step). :class:`TPRUGRPOTrainer`'s loader yields :class:`RowRef` (a row index);
the rows are decoded only when a rollout is generated, each distinct row once. The sampler, and so the data order
and what is trained, are unchanged.

Example:
    >>> trainer = build_grpo_trainer(cfg, model, processor, dataset, run_dir=run)   # doctest: +SKIP
    >>> trainer.train()                                                              # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tpru_agent.errors import ConfigError, TPRUError, require
from tpru_agent.finetune.train.config import FinetuneConfig
from tpru_agent.finetune.train.modeling import gradient_checkpointing, lora_config, use_bf16, use_cuda
from tpru_agent.finetune.train.resume import ExactResumeMixin
from tpru_agent.finetune.train.rewards import resolve_rewards

log = logging.getLogger(__name__)
require("trl", "finetune", what="GRPO training")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402


class BatchCheckError(TPRUError, RuntimeError):
    """A rollout batch whose images and image tokens disagree, or whose prompts are not left-padded."""


def check_multimodal_batch(batch: dict[str, Any], *, image_token_id: int, merge_size: int) -> dict[str, Any]:
    """Verify a GRPO rollout batch (the dict ``_generate_and_score_completions`` returns) and summarise it.

    Checks: prompts are left-padded (each mask row is zeros then ones); ``image_grid_thw`` has one row per
    image; ``pixel_values`` has one row per patch; each prompt holds exactly as many image tokens as its images
    yield features (``t * h * w / merge_size**2`` per image); ``mm_token_type_ids`` marks exactly those tokens.

    Returns:
        A summary: ``rows``, ``images_per_row``, ``image_tokens_per_row``, ``features_per_row``, ``padding_side``.

    Raises:
        BatchCheckError: naming the failed check and the offending row.
    """
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    rows = ids.shape[0]
    for r in range(rows):
        m = mask[r].tolist()
        first = m.index(1) if 1 in m else len(m)
        if any(v != 0 for v in m[:first]) or any(v != 1 for v in m[first:]):
            raise BatchCheckError(f"prompt row {r} is not left-padded (mask {m[:8]}...{m[-8:]}): generation would "
                                  "read padding as context; set the tokenizer's padding_side to 'left'")
    grid = batch.get("image_grid_thw")
    num_images = batch.get("num_images") or [0] * rows
    tokens = ((ids == image_token_id) & (mask == 1)).sum(dim=1).tolist()
    summary = {"rows": rows, "images_per_row": list(num_images), "image_tokens_per_row": tokens,
               "features_per_row": [0] * rows, "padding_side": "left"}
    if grid is None:
        if any(tokens):
            raise BatchCheckError(f"prompts hold image tokens ({tokens}) but the batch has no image_grid_thw")
        return summary
    if grid.shape[0] != sum(num_images):
        raise BatchCheckError(f"image_grid_thw has {grid.shape[0]} rows for {sum(num_images)} images "
                              f"({num_images} per prompt)")
    pixels = batch.get("pixel_values")
    if pixels is not None and pixels.shape[0] != int(grid.prod(dim=-1).sum()):
        raise BatchCheckError(f"pixel_values has {pixels.shape[0]} patch rows; image_grid_thw implies "
                              f"{int(grid.prod(dim=-1).sum())}")
    per_image = (grid.prod(dim=-1) // (merge_size ** 2)).tolist()
    start = 0
    for r, n in enumerate(num_images):
        features = sum(per_image[start:start + n])
        start += n
        summary["features_per_row"][r] = features
        if features != tokens[r]:
            raise BatchCheckError(f"prompt row {r}: {tokens[r]} image tokens but its {n} images give {features} "
                                  "features; the prompt was truncated or the images were misassigned")
    mm = batch.get("mm_token_type_ids")
    if mm is not None:
        marked = mm[:, : ids.shape[1]] == 1
        expected = (ids == image_token_id) & (mask == 1)
        if not bool((marked == expected).all()):
            bad = int((marked != expected).any(dim=1).nonzero()[0, 0])
            raise BatchCheckError(f"prompt row {bad}: mm_token_type_ids do not mark the image tokens of the prompt "
                                  "(the processor padded on the other side than the trainer)")
    return summary


def slice_multimodal(fields: dict[str, Any], images: list | None, rows: slice) -> dict[str, Any]:
    """The processor outputs of prompt rows ``rows``: per-image, per-patch and per-row fields sliced to match.

    Tensors are laid out per image (``image_grid_thw``), per patch (``pixel_values``, ``t*h*w`` rows per image)
    or per prompt row; lists are per prompt row.

    Raises:
        BatchCheckError: a field whose length matches none of these layouts.
    """
    per_row = [len(imgs or []) for imgs in images] if images is not None else []
    first_image, end_image = sum(per_row[:rows.start]), sum(per_row[:rows.stop])
    grid = fields.get("image_grid_thw")
    patches = grid.prod(dim=-1).tolist() if grid is not None else []
    first_patch, end_patch = sum(patches[:first_image]), sum(patches[:end_image])
    n_rows = len(per_row)
    out: dict[str, Any] = {}
    for key, value in fields.items():
        length = len(value)
        if not hasattr(value, "shape"):
            out[key] = value[rows]
        elif grid is not None and length == len(patches) and key != "pixel_values":
            out[key] = value[first_image:end_image]
        elif grid is not None and length == sum(patches):
            out[key] = value[first_patch:end_patch]
        elif length == n_rows:
            out[key] = value[rows]
        else:
            raise BatchCheckError(f"cannot split the processor output {key!r} ({length} rows) into generation "
                                  f"chunks: not per image, per patch or per prompt; set generation_chunk_size: null")
    return out


class RowRef:
    """Training row ``index`` of ``rows``, not yet decoded (what the train loader yields; see the module doc)."""

    __slots__ = ("rows", "index")

    def __init__(self, rows, index: int):
        self.rows, self.index = rows, int(index)

    def __contains__(self, key) -> bool:          # the Trainer asks ``"labels" in batch[0]``; no decoding for that
        return key in (getattr(self.rows, "column_names", None) or ())

    def __repr__(self) -> str:
        return f"RowRef({self.index})"


class RowRefs:
    """Map-style dataset of :class:`RowRef` over ``rows``: same length, so the same sampler and data order."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> RowRef:
        return RowRef(self.rows, index)


def decode_rows(batch: list) -> list:
    """The rows behind a batch of :class:`RowRef` (other items pass through), in order; each distinct row is
    decoded once and its copies (one per generation) share the decoded images."""
    refs = [x for x in batch if isinstance(x, RowRef)]
    if not refs:
        return batch
    rows = refs[0].rows
    unique = list(dict.fromkeys(x.index for x in refs))
    getitems = getattr(rows, "__getitems__", None)
    decoded = getitems(unique) if getitems is not None else [rows[i] for i in unique]
    by_index = dict(zip(unique, decoded))
    seen: set[int] = set()
    out = []
    for x in batch:
        if not isinstance(x, RowRef):
            out.append(x)
            continue
        row = by_index[x.index]
        if x.index in seen:   # a copy: its own dict and lists, the same (read-only) images
            row = {k: list(v) if isinstance(v, list) else v for k, v in row.items()}
        seen.add(x.index)
        out.append(row)
    return out


class TPRUGRPOTrainer(ExactResumeMixin, GRPOTrainer):
    """``GRPOTrainer`` that checks every rollout batch and reports the rows each rollout used.

    Args:
        on_rollout: called as ``on_rollout(global_step, row_ids, summary)`` after each rollout.
        generation_chunk_size: most completions one ``generate`` call holds (``None``: the whole rollout, TRL's way).
        *args, **kwargs: as for ``trl.GRPOTrainer``.
    """

    def __init__(self, *args, on_rollout: Callable[[int, list, dict], None] | None = None,
                 generation_chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_rollout = on_rollout
        self.generation_chunk_size = generation_chunk_size
        self.last_batch_summary: dict[str, Any] | None = None
        config = self.model.config
        self._image_token_id = getattr(config, "image_token_id", None)
        self._merge_size = getattr(self.processing_class.image_processor, "merge_size", 2)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's generation, at most ``generation_chunk_size`` completions per ``generate`` call.

        TRL generates a whole rollout (``prompts_per_rollout x num_generations`` completions, 512 at the paper's
        256 prompts x 2) in one call, holding every prompt's pixels, activations and KV cache at once; chunks bound
        what one call holds. On the tiny model at 64 completions x 64 tokens it did not change the peak
        (benchmarks/finetune_memory.py); whether it is what outgrew 24 GB at 512 x 1,024 tokens is not measured.
        """
        chunk = self.generation_chunk_size
        paged = getattr(self.args, "use_transformers_paged", False) or \
            getattr(self.args, "use_transformers_continuous_batching", False)
        if self.use_vllm or paged or not chunk or len(prompt_ids) <= chunk:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        completion_ids, logprobs = [], []
        for start in range(0, len(prompt_ids), chunk):
            rows = slice(start, min(len(prompt_ids), start + chunk))
            part_images = images[rows] if images is not None else None
            fields = slice_multimodal(multimodal_fields, images, rows)
            ids, lps = super()._generate_single_turn(prompt_ids[rows], part_images, fields, num_generations,
                                                     has_tool_images)
            completion_ids.extend(ids)
            logprobs = None if lps is None or logprobs is None else logprobs + list(lps)
        return completion_ids, logprobs

    def get_train_dataloader(self):
        """TRL's train loader over :class:`RowRefs`: the same sampler and batches, rows decoded at generation."""
        import torch

        dataset = self.train_dataset
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            return super().get_train_dataloader()
        return self._get_dataloader(dataset=RowRefs(dataset), description="Training",
                                    batch_size=self._train_batch_size * self.args.steps_per_generation,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def _generate_and_score_completions(self, inputs):
        inputs = decode_rows(inputs)
        output = super()._generate_and_score_completions(inputs)
        if self._image_token_id is not None:
            self.last_batch_summary = check_multimodal_batch(output, image_token_id=self._image_token_id,
                                                             merge_size=self._merge_size)
        if self.on_rollout is not None and self.model.training:
            rows = list(dict.fromkeys(x.get("row_id") for x in inputs))
            self.on_rollout(self.state.global_step, rows, self.last_batch_summary or {})
        return output


def grpo_args(cfg: FinetuneConfig, output_dir: str | Path, *, max_steps: int | None = None) -> GRPOConfig:
    """TRL's ``GRPOConfig`` for this run: the TPRU recipe mapped onto TRL's batch terms.

    TRL counts completions: a rollout generates ``prompts_per_rollout x num_generations`` completions
    (``generation_batch_size``), an optimizer update consumes ``prompts_per_update x num_generations`` of them
    (``per_device_train_batch_size x GPUs x gradient_accumulation_steps``). The paper's 256 / 128 prompts thus
    give two optimizer updates per rollout; TRL's ``global_step`` counts updates. Only what the config computes
    with or decides is set here; ``cfg.trl`` (GRPOConfig fields passed through: the paper's sampling, schedule,
    weight decay, clipping... from :data:`~tpru_agent.finetune.train.config.TRL_DEFAULTS`) is applied last.
    """
    cuda = use_cuda(cfg)
    vllm = cfg.use_vllm if cfg.use_vllm is not None else (cuda and _vllm_installed())
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        generation_batch_size=cfg.generation_batch_size,
        num_generations=cfg.num_generations, beta=cfg.beta, max_completion_length=cfg.max_completion_length,
        learning_rate=cfg.learning_rate, optim=cfg.optim,
        max_steps=cfg.max_steps if max_steps is None else max_steps,
        bf16=use_bf16(cfg), use_cpu=not cuda, gradient_checkpointing=gradient_checkpointing(cfg),
        seed=cfg.seed, data_seed=cfg.seed, save_strategy="steps", save_steps=cfg.save_steps,
        report_to=[], disable_tqdm=True,
        reward_weights=cfg.reward_weights, remove_unused_columns=False, dataloader_num_workers=0,
        use_vllm=vllm, vllm_mode="colocate", log_completions=False,
        # The policy keeps fp32 master weights (see modeling.train_dtype); the frozen reference needs only bf16.
        # The reference model is loaded from the base folder: safetensors only, as the policy (no pickles).
        model_init_kwargs={"use_safetensors": True, **({"dtype": "bfloat16"} if use_bf16(cfg) and cfg.peft == "none"
                                                       and cfg.beta > 0 else {})},
    )
    # GRPOConfig fields passed through from the config (TRL_DEFAULTS unless set)
    return GRPOConfig(**{**kwargs, **cfg.trl})


def fit_rollout(cfg: FinetuneConfig, rows: int) -> tuple[FinetuneConfig, str | None]:
    """Shrink the rollout and the update to a training split smaller than one rollout; ``(cfg, note)``.

    TRL drops an incomplete rollout, so a split with fewer prompts than ``prompts_per_rollout`` would train 0
    steps. The update becomes the largest prompt count <= ``min(prompts_per_update, rows)`` whose completions
    fill whole micro-batches, and the rollout the largest multiple of it <= ``rows``. ``note`` (``None`` when
    nothing changed) says what was changed, for the log and the model card.

    Raises:
        ConfigError: no update size fits the micro-batch, naming the fix.
    """
    from dataclasses import replace

    if rows >= cfg.prompts_per_rollout:
        return cfg, None
    per_step = cfg.per_device_train_batch_size * cfg.world_size
    update = next((u for u in range(min(cfg.prompts_per_update, rows), 0, -1)
                   if (u * cfg.num_generations) % per_step == 0), None)
    if update is None:
        raise ConfigError(
            f"the train split has {rows} prompts, fewer than one rollout (prompts_per_rollout="
            f"{cfg.prompts_per_rollout}), and no update of <= {rows} prompts x {cfg.num_generations} generations "
            f"fills micro-batches of {per_step} completions: set per_device_train_batch_size to "
            f"{cfg.num_generations} (or a divisor of it), or add training data")
    rollout = rows // update * update
    note = (f"the train split has {rows} prompts, fewer than one rollout (prompts_per_rollout="
            f"{cfg.prompts_per_rollout}): fitted prompts_per_rollout {cfg.prompts_per_rollout} -> {rollout} and "
            f"prompts_per_update {cfg.prompts_per_update} -> {update}, so that training runs; each update averages "
            f"over {update} prompts instead of {cfg.prompts_per_update}")
    return replace(cfg, prompts_per_rollout=rollout, prompts_per_update=update), note


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def build_grpo_trainer(cfg: FinetuneConfig, model, processor, dataset, *, output_dir: str | Path,
                       callbacks: list | None = None, max_steps: int | None = None,
                       on_rollout: Callable[[int, list, dict], None] | None = None) -> TPRUGRPOTrainer:
    """A GRPO trainer over ``dataset`` (from :func:`tpru_agent.finetune.train.inputs.load_split`)."""
    return TPRUGRPOTrainer(
        model=model,
        reward_funcs=resolve_rewards(cfg.rewards),
        args=grpo_args(cfg, output_dir, max_steps=max_steps),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(cfg),
        callbacks=callbacks,
        on_rollout=on_rollout,
        generation_chunk_size=cfg.generation_chunk_size or cfg.per_device_train_batch_size,
    )
