"""Supervised warm-up through TRL's ``SFTTrainer`` on the same TPRU data (``--method sft`` / ``sft+grpo``).

The paper trains with GRPO alone and names cheaper training paradigms as open work. A short supervised stage
teaches the answer format (``<think>...</think><answer>...</answer>``) and the label vocabulary first, so the
following GRPO rollouts start with nonzero rewards. The target is a short, templated reasoning that states the
answer, followed by the answer block: the data has no reasoning traces, and an invented chain of thought longer
than one sentence would teach the model to fabricate. The loss covers the completion only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tpru_agent.errors import require
from tpru_agent.finetune.train.config import FinetuneConfig
from tpru_agent.finetune.train.modeling import gradient_checkpointing, lora_config, use_bf16, use_cuda
from tpru_agent.tasks import NONE_TEXT

log = logging.getLogger(__name__)


def sft_target(answer: str, *, task: str = "", negative: bool = False, style: str = "reasoning") -> str:
    """The assistant text the warm-up trains on: one sentence of reasoning, then the answer block.

    ``style="answer"`` trains the answer block alone (``<answer>CABD</answer>``): what fast mode scores, and the
    target that lets a small model learn the order itself instead of the format tokens around it (FIELD-NOTES:
    with the reasoning target a 5.8M model stayed at chance even on 64 memorised questions; with the answer
    target it reached 0.94).

    Example:
        >>> sft_target("CABD").split("</think>")[1]
        '<answer>CABD</answer>'
        >>> sft_target("CABD").split(", the ")[1]
        'images in temporal order are C, A, B, D.</think><answer>CABD</answer>'
        >>> sft_target("E", task="next", negative=True).endswith("provided.</think><answer>E</answer>")
        True
    """
    answer = answer.strip()
    if style == "answer":
        return f"<answer>{answer}</answer>"
    if len(answer) > 1:
        why = f"Following the procedure step by step, the images in temporal order are {', '.join(answer)}."
    elif negative:
        why = f"No candidate fits both the images and the description, so the answer is {NONE_TEXT}."
    else:
        step = {"next": "the next step", "previous": "the previous step", "ordering_mcq": "the correct order"}
        why = f"Option {answer} shows {step.get(task, 'the correct answer')} of the procedure."
    return f"<think>{why}</think><answer>{answer}</answer>"


def sft_steps(cfg: FinetuneConfig) -> int:
    """Step limit of the warm-up: the smaller of ``sft_max_steps`` and ``max_steps`` (``--max-steps`` bounds every
    stage); -1 (whole epochs) when neither is set.

    Example:
        >>> sft_steps(FinetuneConfig(data="d", max_steps=2)), sft_steps(FinetuneConfig(data="d", sft_max_steps=5))
        (2, 5)
    """
    limits = [n for n in (cfg.sft_max_steps, cfg.max_steps) if n > 0]
    return min(limits) if limits else -1


#: Pass-through fields the warm-up sets from its own ``sft_*`` keys instead.
SFT_OWN = frozenset({"num_train_epochs"})


def shared_trainer_args(cfg: FinetuneConfig) -> dict[str, Any]:
    """The pass-through fields (``cfg.trl``) the warm-up uses too: those ``SFTConfig`` declares and that mean the same
    in both stages, i.e. ``TrainingArguments``' own (schedule, warm-up, weight decay, grad clip, checkpoints kept,
    logging...). GRPO-only fields are left out: sampling, clipping, and ``loss_type`` (SFT's is ``nll`` / ``dft``).

    Example:
        >>> sorted(shared_trainer_args(FinetuneConfig(data="d", trl={"warmup_steps": 20, "epsilon": 0.1})))[:3]
        ['logging_steps', 'lr_scheduler_type', 'max_grad_norm']
    """
    import typing

    from transformers import TrainingArguments

    trl = require("trl", "finetune", what="SFT training")
    sft, common = typing.get_type_hints(trl.SFTConfig), typing.get_type_hints(TrainingArguments)
    return {k: v for k, v in cfg.trl.items() if k in sft and k in common and k not in SFT_OWN}


def sft_args(cfg: FinetuneConfig, output_dir: str | Path, *, max_steps: int | None = None):
    """TRL's ``SFTConfig`` for the warm-up (no truncation: a cut prompt would drop image tokens); the shared
    pass-through fields (:func:`shared_trainer_args`) are applied last, as ``grpo_args`` applies ``cfg.trl``."""
    trl = require("trl", "finetune", what="SFT training")
    steps = sft_steps(cfg) if max_steps is None else max_steps
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.sft_batch_size,
        gradient_accumulation_steps=cfg.sft_gradient_accumulation_steps,
        learning_rate=cfg.sft_learning_rate, optim=cfg.optim,
        num_train_epochs=cfg.sft_epochs, max_steps=steps, max_length=None, completion_only_loss=True,
        bf16=use_bf16(cfg), use_cpu=not use_cuda(cfg), gradient_checkpointing=gradient_checkpointing(cfg),
        seed=cfg.seed, data_seed=cfg.seed, save_strategy="steps", save_steps=cfg.save_steps,
        report_to=[], disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )
    return trl.SFTConfig(**{**kwargs, **shared_trainer_args(cfg)})


def build_sft_trainer(cfg: FinetuneConfig, model, processor, dataset, *, output_dir: str | Path,
                      callbacks: list | None = None, max_steps: int | None = None) -> Any:
    """An SFT trainer over ``dataset`` (from ``load_split(..., completion_fn=sft_target)``)."""
    trl = require("trl", "finetune", what="SFT training")
    from tpru_agent.finetune.train.resume import ExactResumeMixin

    class TPRUSFTTrainer(ExactResumeMixin, trl.SFTTrainer):
        """``SFTTrainer`` whose resume loads the checkpoint's weights (see :mod:`tpru_agent.finetune.train.resume`)."""

    return TPRUSFTTrainer(model=model, args=sft_args(cfg, output_dir, max_steps=max_steps),
                          train_dataset=dataset, processing_class=processor,
                          peft_config=lora_config(cfg), callbacks=callbacks)
