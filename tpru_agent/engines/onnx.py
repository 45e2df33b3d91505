"""The ONNX Runtime engine: a folder written by ``tpru export --format onnx`` (vision / embed / decoder graphs).

Runs without torch or transformers: the chat template is rendered with Jinja, the tokenizer is ``tokenizers``,
the M-RoPE positions are computed in numpy (:mod:`tpru_agent.engines.chat`). Prompts, token ids and continuation
scores are those of the hf engine. Frames are resized to the export's fixed frame size; their visual tokens are
cached by content, and the last prompt's key/value cache is kept, so a ``score`` after a ``generate`` on the same
request (or a new question over the same frames) re-runs only the tokens that changed. Token usage counts what
ran, as the hf engine's does: tokens reused from the last prompt's key/values are not counted again.

Example:
    >>> from tpru_agent import TPRU
    >>> model = TPRU("tpru-3b-onnx", engine="onnx", threads=4)          # doctest: +SKIP
    >>> model.order_frames(["a.png", "b.png", "c.png", "d.png"], mode="fast").order   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from tpru_agent.engines.base import (
    Engine,
    GenerationOptions,
    Request,
    distinct,
    no_quantization,
    only_auto,
    score_shared_prefix,
)
from tpru_agent.engines.chat import (
    common_prefix,
    expand_image_pads,
    load_chat_template,
    log_softmax,
    next_token,
    render_chat,
    rope_index,
    split_prompt,
)
from tpru_agent.engines.ort_setup import GPU_FIX, installed_distributions, runtime_problem
from tpru_agent.errors import ConfigError, EngineClosedError, ModelNotFoundError, require
from tpru_agent.hub import ONNX_MANIFEST, resolve
from tpru_agent.images import fingerprint
from tpru_agent.onnx.manifest import read_manifest
from tpru_agent.sizing import serving_budget

log = logging.getLogger(__name__)

#: Key/value bytes one ``score`` batch may hold (the shared prefix is repeated once per candidate in the batch).
SCORE_CACHE_BYTES = 1 << 30
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def check_device(device: str) -> tuple[str, str]:
    """``(kind, index)`` of a device string the onnx engine runs on.

    Raises:
        ConfigError: anything but ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    """
    kind, _, index = str(device).lower().partition(":")
    if kind not in {"auto", "cpu", "cuda"} or (index and not index.isdigit()):
        raise ConfigError(f"device {device!r} is not supported by the onnx engine; use 'auto', 'cpu', 'cuda' or "
                          "'cuda:N'")
    return kind, index


def pick_providers(device: str, available: Sequence[str]) -> tuple[list, bool]:
    """ONNX Runtime providers for ``device`` and whether CUDA was asked for explicitly.

    ``"auto"`` takes CUDA when the installed onnxruntime offers it; ``"cuda"`` / ``"cuda:N"`` without it falls back
    to the CPU with one warning; ``"cpu"`` is the CPU.

    Raises:
        ConfigError: an unknown device string.
    """
    kind, index = check_device(device)
    wants_cuda = kind == "cuda"
    if kind == "cpu" or (kind == "auto" and _CUDA not in available):
        return [_CPU], False
    if _CUDA not in available:
        log.warning("device %r asked for CUDA but this onnxruntime has no CUDA provider (available: %s); running "
                    "on the CPU. Fix: `%s` (onnxruntime and onnxruntime-gpu share one package folder: remove both "
                    "first)", device, ", ".join(available), GPU_FIX)
        return [_CPU], False
    return [(_CUDA, {"device_id": int(index or 0)}), _CPU], wants_cuda


_warned_setup: set[str] = set()


def warn_setup(problem: str | None) -> None:
    """Log an ONNX Runtime install problem (:func:`runtime_problem`) once per process."""
    if problem and problem not in _warned_setup:
        _warned_setup.add(problem)
        log.warning("%s", problem)


def _folder(model) -> Path:
    ref = resolve(model)
    if ref.onnx_folder is not None:
        return ref.onnx_folder  # an export folder, or a model folder carrying its export in onnx/ (tpru-nano)
    if ref.kind != "local" or not ref.is_onnx:
        target = ref.target if ref.kind == "local" else "DIR"
        raise ModelNotFoundError(
            f"the onnx engine runs a folder written by `tpru export`, and {str(model)!r} is not one (no "
            f"{ONNX_MANIFEST}). Export it first: tpru export --model {model} --format onnx --out {target}-onnx; "
            "or use engine='hf'")
    return Path(ref.target)


class ONNXEngine(Engine):
    """Qwen2.5-VL exported to ONNX, run with ONNX Runtime: ``generate`` and cached-prefix ``score``.

    Args:
        model: an export folder (holds ``tpru_onnx.json``), a model folder carrying its export in ``onnx/``, or
            ``"tpru-nano"`` (shipped inside the package).
        device: ``"auto"`` (CUDA when onnxruntime-gpu is installed, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        threads: intra-op threads per session; default ``$OMP_NUM_THREADS`` when set, else ONNX Runtime's choice.
        score_batch_size: candidates run together in one ``score`` pass; ``None`` sizes it from memory.
        image_cache: how many frames' visual tokens are kept (by content), so windows and checkers that show a
            frame again skip the vision encoder.
        dtype: ``"auto"`` only: the precision is the export's (fp32, or int8 from ``tpru export --int8``).
        quantization: ``None`` only (quantise when exporting: ``tpru export --int8``).
        min_pixels, max_pixels: the budget frames are sized at before the export's fixed frame size (default:
            the folder's ``tpru_budget.json``, else TPRU's).

    Raises:
        ModelNotFoundError: not an export folder, or files missing from it.
        ConfigError: a bad device, a dtype or quantization (fixed by the export), or a manifest of another
            format version.
        EngineUnavailableError: onnxruntime or tokenizers is not installed (extra ``onnx``).
    """

    name = "onnx"

    def __init__(self, model: str | os.PathLike, *, device: str = "auto", threads: int | None = None,
                 score_batch_size: int | None = None, image_cache: int = 64, dtype: str = "auto",
                 quantization: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None):
        no_quantization(quantization)
        only_auto("dtype", dtype, "onnx", "an export's precision is fixed when it is written (fp32, or int8 with "
                  "`tpru export --int8`)")
        check_device(device)  # a bad device string fails before anything loads
        ort = require("onnxruntime", "onnx", what="the onnx engine")
        tokenizers = require("tokenizers", "onnx", what="the onnx engine")
        if score_batch_size is not None and score_batch_size < 1:
            raise ConfigError(f"score_batch_size must be >= 1 or None, got {score_batch_size}")
        if image_cache < 0:
            raise ConfigError(f"image_cache must be >= 0 (frames kept), got {image_cache}")
        self.folder = _folder(model)
        self.manifest = read_manifest(self.folder)
        #: frames are sized at the budget the model was trained at (``tpru_budget.json``, copied by the export)
        #: before the fixed export size; the facade's ``budget="auto"`` takes it from here, as from the hf engine
        self.budget = serving_budget(self.folder, min_pixels, max_pixels)
        if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = int(os.environ["OMP_NUM_THREADS"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or 0)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        available = ort.get_available_providers()
        providers, wants_cuda = pick_providers(device, available)
        warn_setup(runtime_problem(installed_distributions(), available, wants_cuda=False))
        self.sessions = {name: ort.InferenceSession(str(self.folder / graph["file"]), options, providers=providers)
                         for name, graph in self.manifest["graphs"].items()}
        self.providers = self.sessions["decoder"].get_providers()
        if wants_cuda and _CUDA not in self.providers:
            log.warning("device %r: onnxruntime could not start CUDA (missing CUDA / cuDNN libraries?); running on "
                        "the CPU", device)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.template = load_chat_template(self.folder)
        self.threads, self.score_batch_size, self._image_cache_size = threads, score_batch_size, image_cache
        self._setup_ids()
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self._last: tuple | None = None  # (ids, image keys, key/value arrays) of the last prefill
        self._warned_resize = False
        self._lock = threading.RLock()  # the caches are shared state: one call at a time (e.g. under a server)

    def _setup_ids(self) -> None:
        m = self.manifest
        frame, text = m["frame"], m["text"]
        self.frame_size = (frame["width"], frame["height"])
        self.frame_tokens, self.grid = frame["tokens"], frame["grid_thw"]
        self.image_id, self.merge = m["token_ids"]["image"], m["spatial_merge_size"]
        self.n_layers, self.kv_heads, self.head_dim = text["num_layers"], text["num_kv_heads"], text["head_dim"]
        self.dtype = np.float32
        gen_path = self.folder / "generation_config.json"
        gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
        eos = gen.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        im_end = self.tokenizer.token_to_id("<|im_end|>")
        if im_end is not None:
            self.eos.add(im_end)
        self.pad_id = gen.get("pad_token_id") or 0

    # ------------------------------------------------------------------ prompts and images
    def chat_text(self, request: Request, *, reply: str = "") -> str:
        """The templated conversation for ``request`` up to the assistant turn, followed by ``reply``."""
        messages = [{"role": "user", "content": split_prompt(request.text, len(request.images))}]
        return render_chat(self.template, messages, add_generation_prompt=True) + reply

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _pixels(self, image) -> np.ndarray:
        image = image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
        if image.size != self.frame_size:
            from PIL import Image

            if not self._warned_resize:
                self._warned_resize = True
                log.info("frames of %dx%d are resized to the export's fixed %dx%d (tpru export --frame-size)",
                         *image.size, *self.frame_size)
            image = image.resize(self.frame_size, Image.Resampling.BICUBIC)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))

    def _vision(self, images) -> tuple[list[np.ndarray], tuple[str, ...]]:
        """Visual tokens per image (cached by content) and the images' keys."""
        feats, keys = [], []
        for image in images:
            pixels = self._pixels(image)
            key = fingerprint(pixels)
            feat = self._images.get(key)
            if feat is None:
                feat = self._live()["vision"].run(None, {"pixels": pixels})[0]
                self._images[key] = feat
                while len(self._images) > self._image_cache_size:
                    self._images.popitem(last=False)
            else:
                self._images.move_to_end(key)
            feats.append(feat)
            keys.append(key)
        return feats, tuple(keys)

    def _live(self) -> dict:
        if self.sessions is None:
            raise EngineClosedError("this ONNXEngine was closed; create a new one")
        return self.sessions

    # ------------------------------------------------------------------ graph calls
    def _decode(self, embeds: np.ndarray, positions: np.ndarray, total: int, index: np.ndarray, past: list | None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: logits at ``index`` and the key/values of every position so far."""
        batch = embeds.shape[0]
        if past is None:
            past = [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype)] * (2 * self.n_layers)
        feed = {"inputs_embeds": embeds.astype(self.dtype, copy=False), "position_ids": positions,
                "attention_mask": np.ones((batch, total), dtype=np.int64), "logits_index": index}
        for i in range(self.n_layers):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
        feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        out = self._live()["decoder"].run(None, feed)
        return out[0], out[1:]

    def _embed(self, ids: Sequence[int]) -> np.ndarray:
        return self._live()["embed"].run(None, {"input_ids": np.asarray([ids], dtype=np.int64)})[0]

    def _prefill(self, ids: list[int], images) -> tuple[np.ndarray, list[np.ndarray], int]:
        """Run ``ids`` (images scattered at their tokens): next-token log-probs, key/values, M-RoPE delta.

        The key/values of the longest prefix shared with the previous prefill (same images) are reused.
        """
        feats, keys = self._vision(images)
        positions, delta = rope_index(ids, self.image_id, [self.grid] * len(feats), self.merge)
        start, past = 0, None
        if self._last is not None and self._last[1] == keys:
            start = min(common_prefix([self._last[0], ids]), len(ids) - 1)
            past = [kv[:, :, :start] for kv in self._last[2]] if start > 0 else None
        embeds = self._embed(ids[start:])
        at = np.flatnonzero(np.asarray(ids) == self.image_id)
        if len(at) != len(feats) * self.frame_tokens:
            raise ConfigError(f"the prompt has {len(at)} image tokens for {len(feats)} image(s) of "
                              f"{self.frame_tokens} tokens")
        if len(at):
            visual = np.concatenate(feats, axis=0)
            later = at >= start
            embeds[0, at[later] - start] = visual[later]
        logits, present = self._decode(embeds, positions[:, None, start:], len(ids),
                                       np.asarray([len(ids) - start - 1], dtype=np.int64), past)
        self._last = (list(ids), keys, present)
        self._add_usage(prompt=len(ids) - start, image=int((at >= start).sum()))
        return log_softmax(logits[0, -1]), present, delta

    # ------------------------------------------------------------------ generate
    def generate(self, requests: Sequence[Request], options: GenerationOptions = GenerationOptions()) -> list[str]:
        """One reply per request (new text only, special tokens removed); requests run one after another.

        Greedy when ``options.temperature == 0``, else nucleus sampling seeded by ``options.seed``.
        """
        with self._lock:
            return self._generate(requests, options)

    def _generate(self, requests: Sequence[Request], options: GenerationOptions) -> list[str]:
        self._live()
        rng = np.random.default_rng(options.seed)
        replies = []
        for request in requests:
            prompt = self.chat_text(request)
            ids = self._encode(expand_image_pads(prompt, [self.frame_tokens] * len(request.images)))
            logp, kv, delta = self._prefill(ids, request.images)
            new: list[int] = []
            for _ in range(options.max_new_tokens):
                token = next_token(logp, options.temperature, options.top_p, rng)
                if token in self.eos:
                    self._add_usage(generated=1)  # the stop token was decoded too
                    break
                new.append(token)
                if len(new) == options.max_new_tokens:
                    break
                pos = len(ids) + len(new) - 1
                positions = np.full((3, 1, 1), pos + delta, dtype=np.int64)
                logits, kv = self._decode(self._embed([token]), positions, pos + 1, np.zeros(1, dtype=np.int64), kv)
                logp = log_softmax(logits[0, -1])
            self._add_usage(generated=len(new))
            self._last = ((ids + new)[:kv[0].shape[2]], self._last[1], kv)
            replies.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return replies

    # ------------------------------------------------------------------ score
    def score(self, request: Request, continuations: Sequence[str], *, prefix: str = "") -> list[float]:
        """Log-probability of each continuation as the assistant reply after ``prefix`` (same values as hf).

        A value is the sum of the log-probs of the candidate's tokens after the longest token prefix shared by
        every candidate and by the bare prompt + ``prefix``; that shared part runs once.

        Raises:
            ConfigError: repeated continuations, or a placeholder / image count mismatch.
        """
        with self._lock:
            return self._score(request, continuations, prefix)

    def _score(self, request: Request, continuations: Sequence[str], prefix: str) -> list[float]:
        self._live()
        conts = distinct(continuations)
        if not conts:
            return []
        prompt = expand_image_pads(self.chat_text(request, reply=prefix), [self.frame_tokens] * len(request.images))
        return score_shared_prefix(prompt, conts, encode=self._encode,
                                   prefill=lambda ids: self._prefill(ids, request.images),
                                   run_rests=self._score_rests, chunk_size=self._chunk_size)

    def _chunk_size(self, kv: list[np.ndarray], n: int) -> int:
        per_copy = sum(a.nbytes for a in kv)
        return self.score_batch_size or max(1, min(n or 1, SCORE_CACHE_BYTES // max(per_copy, 1)))

    def _score_rests(self, rests: list[list[int]], kv: list[np.ndarray], shared: int, delta: int) -> list[float]:
        """Sum of log-probs of tokens 1.. of each rest on the shared cache (token 0 is scored by the prefill)."""
        width, batch = max(len(r) for r in rests) - 1, len(rests)
        ids = np.asarray([r[:-1] + [self.pad_id] * (width - len(r) + 1) for r in rests], dtype=np.int64)
        embeds = self._live()["embed"].run(None, {"input_ids": ids})[0]
        positions = np.broadcast_to(np.arange(shared, shared + width) + delta, (3, batch, width)).copy()
        past = [np.repeat(a, batch, axis=0) for a in kv]
        # Right padding needs no mask: a causal model never lets a real token see the pads after it.
        logits, _ = self._decode(embeds, positions, shared + width, np.arange(width, dtype=np.int64), past)
        self._add_usage(prompt=sum(len(r) - 1 for r in rests))
        logp = log_softmax(logits)
        return [float(logp[b, np.arange(len(r) - 1), r[1:]].sum()) for b, r in enumerate(rests)]

    # ------------------------------------------------------------------ housekeeping
    def info(self) -> dict:
        """What is loaded: export folder, precision, providers, frame size, graph sizes on disk, source model."""
        m = self.manifest
        return {
            "engine": self.name, "model": str(self.folder), "source_model": m.get("source_model"),
            "precision": m.get("precision"), "providers": list(self.providers), "threads": self.threads,
            "frame_size": list(self.frame_size), "frame_tokens": self.frame_tokens,
            "pixel_budget": self.budget.to_dict(),
            "parameters": m.get("parameters"),
            "graph_bytes": {name: g["bytes"] for name, g in m["graphs"].items()},
        }

    def clear_cache(self) -> None:
        """Forget cached visual tokens and the last prompt's key/values (e.g. between timed runs)."""
        self._images.clear()
        self._last = None

    def close(self) -> None:
        """Free the sessions and caches. Later calls raise."""
        self.sessions = None
        self.clear_cache()

    def __repr__(self) -> str:
        return f"ONNXEngine({str(self.folder)!r}, providers={self.providers!r})"


__all__ = ["ONNXEngine", "pick_providers"]
