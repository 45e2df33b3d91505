"""Resume that continues the uninterrupted run: checkpoint weights loaded under the model's own parameter names.

transformers' ``Trainer`` resumes a plain (not PEFT, not DeepSpeed / FSDP) model with
``model.load_state_dict(checkpoint, strict=False)``. A checkpoint is written with ``save_pretrained``, which stores
Qwen2.5-VL under the Hub key layout (``visual.*``, ``model.layers.*``) while the live model nests them
(``model.visual.*``, ``model.language_model.layers.*``): the keys do not match, nothing of the language model or
vision tower is loaded, no error is raised, and the resumed run trains on from the *base* weights with the
checkpoint's optimizer state (SFT diverged from the very next step: loss 7.5678 vs 7.5980 on the same batch).
:class:`ExactResumeMixin` loads the same files, matched to the live names, and refuses any weight it cannot place.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tpru_agent.errors import TPRUError

log = logging.getLogger(__name__)


class ResumeError(TPRUError, RuntimeError):
    """A checkpoint whose weights do not map one to one onto the model being resumed."""


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a full-weights checkpoint (one file or a sharded index), or ``[]``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def match_keys(saved: list[str], live: list[str]) -> dict[str, str]:
    """``{saved key: live key}``: equal names, or the saved name (without its first component when that is
    ``model``) as the dotted tail of exactly one live name (``model.layers.0.x`` -> ``model.language_model.layers.0.x``).

    Raises:
        ResumeError: a saved key that matches no live key, or several.

    Example:
        >>> match_keys(["visual.a", "model.layers.0.w", "lm_head.weight"],
        ...            ["model.visual.a", "model.language_model.layers.0.w", "lm_head.weight"])["model.layers.0.w"]
        'model.language_model.layers.0.w'
    """
    live_set = set(live)
    out: dict[str, str] = {}
    for key in saved:
        if key in live_set:
            out[key] = key
            continue
        tails = {"." + key}
        if key.startswith("model."):
            tails.add("." + key.removeprefix("model."))
        found = [name for name in live if any(name.endswith(t) for t in tails)]
        if len(found) != 1:
            raise ResumeError(f"checkpoint weight {key!r} matches {len(found)} parameters of the model "
                              f"({found[:3]}); the checkpoint does not belong to this model")
        out[key] = found[0]
    return out


def load_checkpoint_weights(model, folder: str | os.PathLike) -> int:
    """Load a ``save_pretrained`` checkpoint into ``model`` under its live names; returns the tensors loaded.

    Raises:
        ResumeError: unmatched checkpoint keys, or live parameters left unloaded (other than tied ones).
    """
    from safetensors.torch import load_file

    state: dict = {}
    for file in checkpoint_files(Path(folder)):
        state.update(load_file(str(file), device="cpu"))
    live = model.state_dict()
    mapping = match_keys(list(state), list(live))
    renamed = {mapping[k]: v for k, v in state.items()}
    result = model.load_state_dict(renamed, strict=False)
    loaded = {p.data_ptr() for name, p in model.state_dict().items() if name in renamed}
    missing = [k for k in result.missing_keys if live[k].data_ptr() not in loaded]  # tied weights are loaded
    if missing or result.unexpected_keys:
        raise ResumeError(f"checkpoint {str(folder)!r} leaves {len(missing)} parameters unloaded ({missing[:3]}) "
                          f"and has {len(result.unexpected_keys)} unexpected ones; it cannot resume this model")
    return len(renamed)


class ExactResumeMixin:
    """For a ``transformers.Trainer`` subclass: resume full-weight checkpoints under the live parameter names."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        files = checkpoint_files(Path(resume_from_checkpoint))
        plain = not (getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False)
                     or hasattr(model, "peft_config"))
        if not (plain and files):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        count = load_checkpoint_weights(model, resume_from_checkpoint)
        log.info("resumed %d weights from %s", count, resume_from_checkpoint)
        return None
