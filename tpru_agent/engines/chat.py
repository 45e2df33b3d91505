"""Torch-free prompt helpers: chat content for a user turn (hf, onnx) and what ``AutoProcessor`` does (onnx).

They reproduce what ``AutoProcessor`` does for a Qwen2.5-VL user turn, so the prompts, token ids and M-RoPE
positions are the ones the hf engine builds: the chat template rendered with the same Jinja settings, one
``<|image_pad|>`` per merged patch, and ``get_rope_index`` for still images (numpy).

Example:
    >>> render_chat("{% for m in messages %}{{ m['role'] }}{% endfor %}", [{"role": "user", "content": "hi"}])
    'user'
    >>> common_prefix([[1, 2, 3], [1, 2, 4]])
    2
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from tpru_agent.engines.base import common_prefix  # noqa: F401  (re-exported: engines and tests read it from here)
from tpru_agent.errors import ConfigError, ModelNotFoundError
from tpru_agent.tasks.question import split_images

IMAGE_PAD = "<|image_pad|>"


def split_prompt(text: str, n_images: int) -> list[dict]:
    """One user turn's content for a chat template: text parts with ``{"type": "image"}`` at each ``<image>``.

    Raises:
        ConfigError: the placeholder count differs from ``n_images``.

    Example:
        >>> split_prompt("A: <image> B: <image>", 2)[1]
        {'type': 'image'}
    """
    content: list[dict] = []
    for i, part in enumerate(split_images(text, n_images)):
        if part:
            content.append({"type": "text", "text": part})
        if i < n_images:
            content.append({"type": "image"})
    return content


def load_chat_template(folder: str | Path) -> str:
    """The chat template of a model folder, found where transformers looks (``chat_template.jinja`` first).

    Raises:
        ModelNotFoundError: the folder holds no chat template.
    """
    root = Path(folder)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = root / name
        if path.is_file():
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, str):
                return template
    raise ModelNotFoundError(f"{str(root)!r} has no chat template (chat_template.jinja, chat_template.json or "
                             "tokenizer_config.json); copy the processor files of the source model into it")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # transformers' settings (chat_template_utils): trim and lstrip blocks, loop controls, these helpers.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **variables) -> str:
    """Render ``messages`` with a Hugging Face chat template, as ``apply_chat_template(tokenize=False)`` does."""
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


def expand_image_pads(text: str, counts: Sequence[int], pad: str = IMAGE_PAD) -> str:
    """Repeat the i-th ``pad`` of ``text`` ``counts[i]`` times (one per visual token), as the processor does.

    Raises:
        ConfigError: the number of pads differs from ``len(counts)``.
    """
    pieces = text.split(pad)
    if len(pieces) - 1 != len(counts):
        raise ConfigError(f"the templated prompt has {len(pieces) - 1} image pad(s) for {len(counts)} image(s)")
    return pieces[0] + "".join(pad * n + piece for n, piece in zip(counts, pieces[1:]))


def rope_index(ids: Sequence[int], image_token_id: int, grids: Sequence[Sequence[int]], merge: int
               ) -> tuple[np.ndarray, int]:
    """Qwen2.5-VL's 3-axis M-RoPE positions for one sequence of text and still images (``get_rope_index``).

    Text tokens advance all three axes together; an image's tokens get (t, row, column) offsets from the
    position where it starts, and the text after it resumes at that start + max(rows, columns).

    Args:
        ids: token ids, with one run of ``image_token_id`` per image.
        grids: ``(t, h, w)`` patch grid per image, in order (``image_grid_thw``).
        merge: the spatial merge size (2).

    Returns:
        ``(positions [3, len(ids)] int64, delta)``: later tokens at index ``i`` sit at ``i + delta``.

    Raises:
        ConfigError: the image token runs do not match ``grids``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    positions = np.zeros((3, len(ids)), dtype=np.int64)
    image_at = np.flatnonzero(ids == image_token_id)
    pos, i, k = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            later = image_at[image_at > i]
            end = int(later[0]) if len(later) else len(ids)
            positions[:, i:end] = np.arange(end - i) + pos
            pos += end - i
            i = end
            continue
        if k >= len(grids):
            raise ConfigError(f"the prompt has more image token runs than the {len(grids)} image grid(s)")
        t, h, w = (int(v) for v in grids[k])
        gh, gw = h // merge, w // merge
        n = t * gh * gw
        if i + n > len(ids) or not (ids[i:i + n] == image_token_id).all():
            raise ConfigError(f"image {k} needs {n} consecutive image tokens at position {i}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        positions[:, i:i + n] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos
        pos += max(gh, gw)
        i += n
        k += 1
    if k != len(grids):
        raise ConfigError(f"the prompt has {k} image token run(s) for {len(grids)} image grid(s)")
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, in float64 for stable sums of many tokens."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when ``temperature == 0``; else nucleus sampling at ``temperature`` / ``top_p``."""
    if temperature <= 0:
        return int(np.argmax(logits))
    probs = np.exp(log_softmax(logits / temperature))
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cum, top_p) + 1)] if top_p < 1 else order
    chosen = probs[keep] / probs[keep].sum()
    return int(rng.choice(keep, p=chosen))


__all__ = ["common_prefix", "expand_image_pads", "load_chat_template", "log_softmax", "next_token", "render_chat",
           "rope_index", "split_prompt"]
