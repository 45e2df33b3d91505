"""Held-out accuracy of the model being trained, by greedy generation (the in-run curve and the model card).

This scores the live model object, in-process, during and right after training: no export, no engine. It
generates each answer greedily with the same prompt the trainer uses and grades it with the TPRU reward's exact
match, so it is the "accuracy" of the paper's tables on the held-out split. ``tpru eval`` (finetune/eval/run.py)
is the full evaluation of saved weights, with per-task tables and intervals.
"""

from __future__ import annotations

import logging
from typing import Any

from tpru_agent.finetune.eval import statistics
from tpru_agent.tasks import accuracy_score, format_score

log = logging.getLogger(__name__)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (:func:`tpru_agent.finetune.eval.statistics.wilson_interval`).

    Example:
        >>> [round(x, 3) for x in wilson_interval(50, 100)]
        [0.404, 0.596]
    """
    return statistics.wilson_interval(hits, n, z)


def evaluate_generation(model, processor, dataset, *, limit: int = 64, max_new_tokens: int = 1024,
                        batch_size: int = 4) -> dict[str, Any]:
    """Greedy answers to the first ``limit`` rows of ``dataset`` (from ``load_split``), graded by exact match.

    Returns:
        ``{"n", "accuracy", "accuracy_ci", "format", "by_task": {task: accuracy}, "samples": [first 3 texts]}``.
    """
    import torch

    n = min(limit, len(dataset))
    was_training = model.training
    model.eval()
    hits, formatted, by_task, samples = 0, 0, {}, []
    device = next(model.parameters()).device
    try:
        for start in range(0, n, batch_size):
            rows = [dataset[i] for i in range(start, min(n, start + batch_size))]
            texts = [processor.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                     for r in rows]
            images = [img for r in rows for img in r["images"]] or None
            inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=processor.tokenizer.pad_token_id)
            answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for row, text in zip(rows, answers):
                hit = accuracy_score(text, row["answer"]) > 0
                hits += hit
                formatted += format_score(text) > 0
                task = by_task.setdefault(row.get("task") or "all", [0, 0])
                task[0] += hit
                task[1] += 1
                if len(samples) < 3:
                    samples.append(text[:300])
    finally:
        model.train(was_training)
    return {"n": n, "accuracy": hits / n if n else 0.0, "accuracy_ci": wilson_interval(hits, n),
            "format": formatted / n if n else 0.0,
            "by_task": {k: v[0] / v[1] for k, v in sorted(by_task.items())}, "samples": samples}
