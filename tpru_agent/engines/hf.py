"""The transformers engine: Qwen2.5-VL (TPRU or base) in fp32 / bf16, or quantised with bitsandbytes.

``score`` runs the prompt (images included) once, keeps its key/value cache, and runs only each candidate's own
tokens on top of it, batched, so ranking 24 permutations costs about one extra short forward pass.

Across calls, a content-keyed prefix cache (:mod:`tpru_agent.engines.prefix_cache`) keeps the key/values of the
prompts already run and the visual features of the frames already seen: a new prompt starts from its longest
cached prefix (same tokens, same images) and a frame is encoded once. Results equal the uncached ones (within
float noise); ``prefix_cache_mb=0`` turns it off.

Token usage (:meth:`~tpru_agent.engines.base.Engine.take_usage`) counts what the model computed: ``score`` its
shared prompt once, from where the prefix cache left off (reused tokens are not counted again), plus each
candidate's own tokens; ``generate`` its prompt the same way and its new tokens up to the stop token.

Example:
    >>> from tpru_agent.engines.hf import HFEngine
    >>> engine = HFEngine("tpru-3b", quantization="4bit")          # doctest: +SKIP
    >>> engine.score(request, ["<answer>A</answer>", "<answer>B</answer>"])   # doctest: +SKIP
    [-0.41, -1.52]
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import logging
import os
import threading
from typing import Sequence

import numpy as np

from tpru_agent import hub
from tpru_agent.engines.base import Engine, GenerationOptions, Request, distinct, score_shared_prefix
from tpru_agent.engines.chat import expand_image_pads, split_prompt
from tpru_agent.engines.hf_options import (
    QUANTIZATIONS,
    check_quantization,
    cpu_auto_dtype,
    load_model,
    pick_device,
    pick_dtype,
)
from tpru_agent.engines.hf_tokens import HFTokens
from tpru_agent.engines.prefix_cache import PrefixCache, Span, fork, image_key, kv_nbytes, tensors_nbytes
from tpru_agent.errors import ConfigError, EngineClosedError, require
from tpru_agent.sizing import PROCESSOR_MAX_PIXELS, PROCESSOR_MIN_PIXELS, resize_to_budget, serving_budget

log = logging.getLogger(__name__)

#: Key/value memory the candidate batch of one ``score`` call may take; more candidates are run in chunks.
SCORE_CACHE_BYTES = {"cuda": 2 << 30, "mps": 1 << 30, "cpu": 1 << 30}


class HFEngine(HFTokens, Engine):
    """Qwen2.5-VL through transformers: ``generate`` (batched, left padded) and cached-prefix ``score``.

    Token-level methods (conversations, token counts, completions with usage and stop sequences, traces) come
    from :class:`~tpru_agent.engines.hf_tokens.HFTokens`; ``tpru serve`` uses them.

    Args:
        model: alias (``"tpru-3b"``), Hub id or local folder (see :func:`tpru_agent.hub.locate`).
        device: ``"auto"`` (cuda > mps > cpu) or a torch device string.
        dtype: ``"auto"`` (bf16 on CUDA; on CPU fp32 when it fits comfortably in memory, else bf16, see
            :func:`~tpru_agent.engines.hf_options.cpu_auto_dtype`; ``info()["dtype_reason"]`` says which and why),
            ``"fp32"``, ``"bf16"``, ``"fp16"``.
        quantization: ``None``, ``"4bit"`` (NF4) or ``"8bit"`` (bitsandbytes, extra ``quant``).
        attn_implementation: passed to transformers (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``).
        revision, cache_dir, local_files_only: where Hub weights come from.
        trust_remote_code: off unless asked; Qwen2.5-VL needs no remote code.
        min_pixels, max_pixels: the pixel budget frames are served at (default: the model folder's own budget,
            see :func:`tpru_agent.sizing.folder_budget`, else TPRU's 16,384..36,864). The engine resizes every frame
            as TPRU's training did (:func:`tpru_agent.sizing.resize_to_budget`; a no-op for frames the SDK already
            sized) and loads the processor at the checkpoint's wide budget, so a ``preprocessor_config.json`` with
            its own ``min_pixels`` / ``max_pixels`` keys only rounds sides to 28, as in training.
        score_batch_size: candidates run together in one ``score`` forward; ``None`` sizes it from memory.
        prefix_cache_mb: memory (MiB, on the model's device) for the prefix key/value cache and the per-frame
            visual features reused across calls; 0 disables it. A 4-frame prompt of Qwen2.5-VL-3B takes ~15 MiB.
        ignore_eos: decode every one of ``max_new_tokens`` (fixed-length timing runs; a random model may stop at
            any token or never).

    Raises:
        ModelNotFoundError: the weights cannot be found (see :mod:`tpru_agent.hub`).
        EngineUnavailableError: torch / transformers (extra ``hf``) or bitsandbytes (extra ``quant``) missing.
        ConfigError: a bad device, dtype or quantization string.
    """

    name = "hf"

    def __init__(self, model: str | os.PathLike, *, device: str = "auto", dtype="auto",
                 quantization: str | None = None, attn_implementation: str | None = None,
                 revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                 local_files_only: bool | None = None, trust_remote_code: bool = False,
                 min_pixels: int | None = None, max_pixels: int | None = None, score_batch_size: int | None = None,
                 prefix_cache_mb: float = 512, ignore_eos: bool = False):
        torch = require("torch", "hf", what="the hf engine")
        transformers = require("transformers", "hf", what="the hf engine")
        self.quantization = check_quantization(quantization)
        if score_batch_size is not None and score_batch_size < 1:
            raise ConfigError(f"score_batch_size must be >= 1 or None, got {score_batch_size}")
        if not prefix_cache_mb >= 0:
            raise ConfigError(f"prefix_cache_mb must be >= 0 (0 disables the prefix cache), got {prefix_cache_mb}")
        if self.quantization:  # before any download: fail fast when the extra is missing
            require("bitsandbytes", "quant", what=f"quantization={self.quantization!r}")
        self.device = pick_device(device, torch)
        self.dtype = pick_dtype(dtype, self.device, torch)
        self.folder = hub.locate(model, revision=revision, cache=cache_dir, local_files_only=local_files_only)
        auto = str(dtype).lower() == "auto"
        self.dtype_reason = f"auto: {str(self.dtype)[6:]} on {self.device}" if auto else "as asked"
        if auto and self.device == "cpu":
            self.dtype, self.dtype_reason = cpu_auto_dtype(self.folder, torch)
        self.budget = serving_budget(self.folder, min_pixels, max_pixels)
        self.score_batch_size = score_batch_size
        self.ignore_eos = ignore_eos
        kwargs = dict(dtype=self.dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                      local_files_only=True, device_map={"": self.device})
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if self.quantization:
            kwargs["quantization_config"] = self._bnb_config(transformers)
        log.info("loading %s from %s on %s (%s, quantization=%s)", model, self.folder, self.device, self.dtype,
                 self.quantization)
        self.model = load_model(transformers, self.folder, kwargs, local_files_only=local_files_only).eval()
        self.processor = transformers.AutoProcessor.from_pretrained(
            self.folder, trust_remote_code=trust_remote_code, local_files_only=True,
            min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS)
        self.processor.tokenizer.padding_side = "left"
        self._torch = torch
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        # One model call at a time: the cache bookkeeping and generate's M-RoPE offset (model.model.rope_deltas)
        # are shared state. The server already serialises its calls on one thread; this guards direct users.
        self._lock = threading.RLock()

    def _bnb_config(self, transformers):
        """NF4 computes in the engine dtype (bf16 on CUDA, fp32 on CPU by default); int8 is LLM.int8."""
        if self.quantization == "4bit":
            return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=self.dtype,
                                                   bnb_4bit_use_double_quant=True)
        # bitsandbytes logs "inputs will be cast ... to float16" on every int8 matmul unless inputs are fp16.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_notice)
        return transformers.BitsAndBytesConfig(load_in_8bit=True)

    # ------------------------------------------------------------------ prompts
    def chat_text(self, request: Request, *, reply: str = "") -> str:
        """The templated conversation for ``request`` up to the assistant turn, followed by ``reply``."""
        content = split_prompt(request.text, len(request.images))
        messages = [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + reply

    def _live(self):
        if self.model is None:
            raise EngineClosedError("this HFEngine was closed; create a new one")
        return self.model

    def _sized(self, request: Request) -> Request:
        """``request`` with every frame at the serving budget (frames the SDK already sized pass unchanged)."""
        images = request.images if self.budget is None else tuple(
            resize_to_budget(im, self.budget) for im in request.images)
        if all(a is b for a, b in zip(images, request.images)):
            return request
        return dataclasses.replace(request, images=images)

    # ------------------------------------------------------------------ generate
    def generate(self, requests: Sequence[Request], options: GenerationOptions = GenerationOptions()) -> list[str]:
        """One reply per request (new text only, special tokens removed), batched with left padding.

        Greedy when ``options.temperature == 0``, else sampling with ``temperature`` / ``top_p`` (seeded by
        ``options.seed`` without touching the global random state). A lone request starts from the prefix cache,
        and leaves its prompt + reply there (a ``score`` after the reasoning then runs only the answer).
        """
        model, torch = self._live(), self._torch
        requests = [self._sized(r) for r in requests]
        kwargs = self._generation_kwargs(options, ignore_eos=self.ignore_eos)  # validates the options too
        if not requests:
            return []
        tok = self.processor.tokenizer
        seed = options.seed if options.temperature > 0 else None
        with self._lock, torch.inference_mode(), self._seeded(seed):
            if len(requests) == 1 and self.prefix_cache.enabled:
                return [self._generate_cached(requests[0], kwargs)]
            texts = [self.chat_text(r) for r in requests]
            images = [im for r in requests for im in r.images]
            inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
            inputs = inputs.to(model.device)
            out = model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        ends = set(kwargs["eos_token_id"] or ())
        self._add_usage(prompt=int(inputs["attention_mask"].sum()),
                        image=int((inputs["input_ids"] == model.config.image_token_id).sum()),
                        generated=sum(_decoded(row, ends) for row in new.tolist()))
        return tok.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _generate_cached(self, request: Request, kwargs: dict) -> str:
        """Prefill all but the prompt's last token from the prefix cache, then let ``model.generate`` decode."""
        torch, model, tok = self._torch, self.model, self.processor.tokenizer
        visual = self._visual(request.images)
        ids = tok(self._expand(self.chat_text(request), visual), add_special_tokens=False)["input_ids"]
        _, cache, delta = self._prefill(ids[:-1], visual)
        work = fork(cache)
        # generate continues from a filled cache: the uncached last token and every new one sit at text position
        # + delta (Qwen2.5-VL's M-RoPE offset after the images), which it reads from model.model.rope_deltas.
        model.model.rope_deltas = delta
        input_ids = torch.tensor([ids], device=model.device)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             **{self._cache_kw: work}, **kwargs)
        full = out[0].tolist()
        self._add_usage(prompt=1, generated=len(full) - len(ids))  # the prompt's last token; _prefill counted the rest
        kept = work.get_seq_length()
        # the images are the prompt's; an image pad token the model generated is text (its key never matches one)
        self.prefix_cache.put(np.asarray(full[:kept]), self._spans(ids, visual), work)
        return tok.decode(full[len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @contextlib.contextmanager
    def _seeded(self, seed: int | None):
        """Seed torch for one call inside a forked random state (the caller's RNG stays as it was)."""
        if seed is None:
            yield
            return
        torch = self._torch
        kind = torch.device(self.device).type
        with torch.random.fork_rng(devices=[] if kind == "cpu" else None,
                                   device_type="cuda" if kind == "cpu" else kind):
            torch.manual_seed(seed)
            yield

    # ------------------------------------------------------------------ score
    def score(self, request: Request, continuations: Sequence[str], *, prefix: str = "") -> list[float]:
        """Log-probability of each continuation as the assistant reply after ``prefix``.

        The shared part (prompt, images, ``prefix`` and whatever tokens every candidate starts with) runs once,
        from the longest prefix already in the prefix cache; each candidate's remaining tokens run on its cached
        keys and values. A value is the sum of the log-probs of the candidate's tokens after the longest token
        prefix shared by every candidate and by the bare prompt + ``prefix`` (tokens, not characters: Qwen glues
        ``>A`` into one token).

        Raises:
            ConfigError: repeated continuations, or a placeholder / image count mismatch.
        """
        model, torch = self._live(), self._torch
        request = self._sized(request)
        conts = distinct(continuations)
        if not conts:
            return []
        prompt = self.chat_text(request, reply=prefix)

        def no_image_tokens(rests: list[list[int]]) -> None:
            if any(model.config.image_token_id in r for r in rests):
                raise ConfigError(f"a continuation contains the image token {self.processor.image_token!r}; "
                                  "continuations must be plain text")

        with self._lock, torch.inference_mode():
            visual = self._visual(request.images)
            tok = self.processor.tokenizer
            return score_shared_prefix(
                self._expand(prompt, visual), conts, encode=lambda t: tok(t, add_special_tokens=False)["input_ids"],
                prefill=lambda ids: self._prefill(ids, visual), run_rests=self._run_rests,
                chunk_size=self._chunk_size, check_rests=no_image_tokens)

    # ------------------------------------------------------------------ cached prefill
    def _visual(self, images) -> list[tuple[str, object, tuple[int, int, int]]]:
        """``(content key, visual tokens [n, hidden], grid (t, h, w))`` per image; only unseen frames are encoded."""
        # without a cache there is nothing to look up: positions stand in for content keys (no hashing)
        keys = [image_key(im) for im in images] if self.prefix_cache.enabled else [f"#{i}" for i in range(len(images))]
        found = {key: self.prefix_cache.feature(key) for key in dict.fromkeys(keys)}
        missing = [key for key, value in found.items() if value is None]
        if missing:
            model = self.model
            pixels = self.processor.image_processor(images=[images[keys.index(k)] for k in missing],
                                                    return_tensors="pt")
            grid = pixels["image_grid_thw"].to(model.device)
            feats = model.model.get_image_features(pixels["pixel_values"].to(model.device, model.dtype),
                                                   grid).pooler_output
            for key, feat, thw in zip(missing, feats, grid.tolist()):
                found[key] = (feat, tuple(thw))
                self.prefix_cache.put_feature(key, found[key], tensors_nbytes([feat]))
        return [(key, *found[key]) for key in keys]

    def _expand(self, prompt: str, visual) -> str:
        """The prompt with each image's single pad token repeated once per visual token, as the processor does."""
        return expand_image_pads(prompt, [len(feat) for _, feat, _ in visual], self.processor.image_token)

    def _spans(self, ids: Sequence[int], visual) -> list[Span]:
        """Where each image's tokens sit in ``ids`` (images in order), with the image's content key."""
        at = np.flatnonzero(np.asarray(ids) == self.model.config.image_token_id)
        spans, used = [], 0
        for key, feat, _ in visual:
            n = len(feat)
            if used + n > len(at) or at[used + n - 1] - at[used] != n - 1:
                raise ConfigError(f"the prompt's image tokens do not match its {len(visual)} image(s)")
            spans.append((int(at[used]), int(at[used]) + n, key))
            used += n
        if used != len(at):
            raise ConfigError(f"the prompt has {len(at)} image tokens for {used} visual tokens")
        return spans

    def _prefill(self, ids: list[int], visual):
        """Forward ``ids`` from the longest cached prefix: next-token log-probs, the cache and the M-RoPE offset.

        Positions come from ``get_rope_index`` over the whole of ``ids`` (text advances all three axes; an image
        takes (t, row, column) offsets from its start), so the part run here continues the cached part exactly.
        """
        torch, model = self._torch, self.model
        from transformers import DynamicCache

        input_ids = torch.tensor([ids], device=model.device)
        spans = self._spans(ids, visual)
        if visual:
            grid = torch.tensor([thw for _, _, thw in visual], device=model.device)
            mm_types = (input_ids == model.config.image_token_id).int()
            positions, delta = model.model.get_rope_index(input_ids, mm_token_type_ids=mm_types, image_grid_thw=grid)
        else:
            positions = torch.arange(len(ids), device=model.device).view(1, 1, -1).expand(3, 1, -1)
            delta = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        key = np.asarray(ids, dtype=np.int64)
        reused, stored = self.prefix_cache.lookup(key, spans)
        reused = min(reused, len(ids) - 1)  # run >= 1 token: its logits score the continuations' first token
        cache = fork(stored, reused) if stored is not None and reused > 0 else DynamicCache(config=model.config)
        reused = reused if stored is not None else 0
        embeds = model.get_input_embeddings()(input_ids[:, reused:])
        for (start, end, _), (_, feat, _) in zip(spans, visual):
            lo = max(start, reused)
            if lo < end:
                embeds[0, lo - reused:end - reused] = feat[lo - start:].to(embeds.dtype)
        out = model(inputs_embeds=embeds, position_ids=positions[..., reused:], use_cache=True, logits_to_keep=1,
                    **{self._cache_kw: cache})
        self.prefix_cache.count(reused, len(ids) - reused)
        self._add_usage(prompt=len(ids) - reused, image=int((key[reused:] == model.config.image_token_id).sum()))
        self.prefix_cache.put(key, spans, cache)
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1), cache, delta

    def _chunk_size(self, cache, n: int) -> int:
        if self.score_batch_size:
            return self.score_batch_size
        per_copy = kv_nbytes(cache)
        budget = SCORE_CACHE_BYTES.get(self._torch.device(self.device).type, 1 << 30)
        return max(1, min(max(n, 1), budget // max(per_copy, 1)))

    def _run_rests(self, rests: list[list[int]], cache, shared: int, delta) -> list[float]:
        """Sum of log-probs of tokens 1.. of each rest (token 0 comes from the prefix), right padded."""
        torch, model = self._torch, self.model
        width = max(len(r) for r in rests) - 1
        pad = self.processor.tokenizer.pad_token_id or 0
        inputs = torch.tensor([r[:-1] + [pad] * (width - len(r) + 1) for r in rests], device=model.device)
        batch = len(rests)
        positions = torch.arange(shared, shared + width, device=model.device) + delta.reshape(-1)[0]
        position_ids = positions.view(1, 1, -1).expand(3, batch, -1)
        local = fork(cache)  # the prefix cache keeps `cache`: repeat and extend a copy
        local.batch_repeat_interleave(batch)
        # Right padding needs no mask: a causal model never lets a real token see the pads after it.
        out = model(input_ids=inputs, position_ids=position_ids, use_cache=True, **{self._cache_kw: local})
        self._add_usage(prompt=sum(len(r) - 1 for r in rests))
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        values = []
        for b, rest in enumerate(rests):
            targets = torch.tensor(rest[1:], device=model.device)
            values.append(float(logp[b, torch.arange(len(rest) - 1, device=model.device), targets].sum()))
        return values

    # ------------------------------------------------------------------ housekeeping
    def cache_info(self) -> dict:
        """The prefix cache: budget and bytes used, entries, hits, tokens reused vs run, evictions."""
        return self.prefix_cache.info()

    def clear_cache(self) -> None:
        """Forget cached prefixes and visual features (e.g. between timed runs); the counters are kept."""
        self.prefix_cache.clear()

    def info(self) -> dict:
        """What is loaded: parameters, memory footprint (bytes), device, dtype, quantization, model folder."""
        model = self._live()
        return {
            "engine": self.name,
            "model": str(self.folder),
            "parameters": int(model.num_parameters()),
            "memory_bytes": int(model.get_memory_footprint()),
            "device": str(model.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_reason": self.dtype_reason,
            "quantization": self.quantization,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "prefix_cache_bytes": self.prefix_cache.budget,
            "pixel_budget": self.budget.to_dict(),
        }

    def close(self) -> None:
        """Free the model (and the GPU memory it held). Later calls raise."""
        if getattr(self, "model", None) is None:
            return
        self.model = None
        self.processor = None
        self.prefix_cache.clear()
        gc.collect()
        torch = self._torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return f"HFEngine({str(self.folder)!r}, device={self.device!r}, quantization={self.quantization!r})"


def _decoded(row: Sequence[int], ends: set[int]) -> int:
    """New tokens of one generated row: up to and including its first stop token (padding after it is not)."""
    return next((i + 1 for i, t in enumerate(row) if t in ends), len(row))


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    return "inputs will be cast" not in str(record.msg)


__all__ = ["HFEngine", "QUANTIZATIONS", "check_quantization", "pick_device", "pick_dtype", "split_prompt"]

