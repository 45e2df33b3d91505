"""Token-level access of the transformers engine: conversations, token counts, completions, teacher-forced traces.

The engine contract (``generate`` / ``score``) has no tokens. ``tpru serve`` needs them for the OpenAI / vLLM
fields (usage, ``finish_reason``, ``stop``, streaming, ``logprobs``, ``prompt_logprobs``, prefilled assistant turns)
and to refuse a prompt over the context limit before running it. :class:`HFTokens` holds those methods;
:class:`tpru_agent.engines.hf.HFEngine` inherits them, so they run under the engine's lock on its own model.

A conversation is a sequence of ``(role, text)`` turns (``system`` / ``user`` / ``assistant``) whose texts hold
one ``<image>`` placeholder per image, the images given in the same order.

Example:
    >>> engine = HFEngine("tpru-3b")                                            # doctest: +SKIP
    >>> turns = [("system", "Answer briefly."), ("user", "What happens next? <image>")]
    >>> engine.count_tokens(turns, [frame])                                      # doctest: +SKIP
    91
    >>> engine.complete(turns, [frame], GenerationOptions(max_new_tokens=32), stop=["\\n"])   # doctest: +SKIP
    Completion(text='The drawer opens.', prompt_tokens=91, completion_tokens=6, finish_reason='stop')
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from tpru_agent.engines.base import GenerationOptions, Request
from tpru_agent.engines.chat import split_prompt
from tpru_agent.errors import ConfigError
from tpru_agent.tasks.question import IMAGE

Turns = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Completion:
    """One assistant reply and what it cost.

    Attributes:
        text: the new text (special tokens removed; cut before the first stop sequence).
        prompt_tokens: tokens of the prompt, image tokens and any prefilled assistant text included.
        completion_tokens: tokens generated.
        finish_reason: ``"stop"`` (end of turn or a stop sequence) or ``"length"`` (``max_new_tokens``, the
            deadline, or cancelled).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class Trace:
    """One forward pass: token ids, where the scored text starts, and what the model predicted at each position."""

    ids: list[int]
    start: int  # first token of the traced text (``tail``)
    logprobs: dict[int, float]  # position -> log-prob of ids[position] given ids[:position]
    tops: dict[int, list[tuple[int, float]]]  # position -> top-k (token id, log-prob) predicted for that position
    ranks: dict[int, int]
    next_top: list[tuple[int, float]]  # top-k after the last token


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins -> bytes (the inverse of GPT-2's ``bytes_to_unicode``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def stable_text(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The part of a growing reply that can be shown now, and whether a stop sequence ended it.

    Cut at the first stop sequence; otherwise hold back a trailing partial character (``\\ufffd``) and any tail
    that could be the start of a stop sequence.
    """
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return text[:end], False


class _Watch:
    """A transformers stopping criterion that also streams: it decodes the new tokens after every step.

    Generation stops at a stop sequence, when ``should_stop()`` says so (client gone, deadline passed), or by
    transformers' own rules (end of turn, ``max_new_tokens``). ``on_text`` gets each newly shown piece of text.
    """

    def __init__(self, tokenizer, stops: Sequence[str], on_text: Callable[[str], None] | None,
                 should_stop: Callable[[], bool] | None):
        self.tok, self.stops, self.on_text, self.should_stop = tokenizer, list(stops), on_text, should_stop
        self.start: int | None = None
        self.new: list[int] = []
        self.shown = ""
        self.hit_stop = False
        self.interrupted = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.start is None:
            self.start = input_ids.shape[1] - 1
        self.new = input_ids[0, self.start:].tolist()
        if self.stops or self.on_text is not None:
            text = self.tok.decode(self.new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            shown, self.hit_stop = stable_text(text, self.stops)
            if self.on_text is not None and len(shown) > len(self.shown):
                self.on_text(shown[len(self.shown):])
            self.shown = max(shown, self.shown, key=len)
        self.interrupted = bool(self.should_stop and self.should_stop())
        done = self.hit_stop or self.interrupted
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class HFTokens:
    """Token-level methods of :class:`~tpru_agent.engines.hf.HFEngine` (it provides ``model``, ``processor``,
    ``_torch``, ``_lock``, ``_live``, ``_seeded``, ``_sized``, ``prefix_cache`` and ``_generate_cached``)."""

    # ------------------------------------------------------------------ decoding options
    def _generation_kwargs(self, options: GenerationOptions, *, ignore_eos: bool = False) -> dict:
        """``model.generate`` keyword arguments for ``options``: the one place they are built.

        Explicit values override the release's generation_config (Qwen ships sampling defaults and a repetition
        penalty): what the caller's options say is what runs, on every engine alike.
        """
        if options.max_new_tokens < 1 or options.temperature < 0 or not 0 < options.top_p <= 1:
            raise ConfigError(f"invalid generation options {options}: need max_new_tokens >= 1, temperature >= 0 "
                              "and 0 < top_p <= 1")
        eos = [] if ignore_eos else sorted(self.eos_ids())
        kwargs = dict(max_new_tokens=options.max_new_tokens, eos_token_id=eos or None,
                      pad_token_id=self.processor.tokenizer.pad_token_id, repetition_penalty=1.0)
        if options.temperature > 0:
            kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def eos_ids(self) -> set[int]:
        """Token ids that end the assistant turn."""
        eos = self._live().generation_config.eos_token_id
        ids = set(eos) if isinstance(eos, (list, tuple)) else set() if eos is None else {eos}
        im_end = self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int):
            ids.add(im_end)
        return ids

    # ------------------------------------------------------------------ conversations and counts
    def render(self, turns: Turns, *, reply: str = "") -> str:
        """The templated conversation up to the assistant turn, followed by ``reply``.

        Raises:
            ConfigError: an unknown role.
        """
        messages = []
        for role, text in turns:
            if role not in ("system", "user", "assistant"):
                raise ConfigError(f"unknown conversation role {role!r}; use system, user or assistant")
            messages.append({"role": role, "content": split_prompt(text, text.count(IMAGE))})
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + reply

    def max_context(self) -> int:
        """The model's own context length (``max_position_embeddings`` of its text config)."""
        config = self._live().config
        text = getattr(config, "text_config", None) or config
        return int(getattr(text, "max_position_embeddings", 32768))

    def image_tokens(self, image) -> int:
        """Visual tokens one image takes in the prompt (after the processor's resize to the pixel budget)."""
        proc = self.processor.image_processor
        width, height = image.size
        return int(proc.get_number_of_image_patches(height, width, {})) // (proc.merge_size ** 2)

    def count_tokens(self, turns: Turns, images: Sequence, *, reply: str = "") -> int:
        """Prompt tokens of a conversation, image tokens included, without running the model."""
        ids = self.processor.tokenizer(self.render(turns, reply=reply), add_special_tokens=False)["input_ids"]
        return len(ids) + sum(self.image_tokens(im) - 1 for im in self._frames(images))

    def text_tokens(self, text: str) -> int:
        """Tokens of a plain piece of text (no template)."""
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry: no text of n characters is fewer than n / this tokens."""
        if getattr(self, "_longest", None) is None:
            self._longest = max(1, max(len(t) for t in self.processor.tokenizer.get_vocab()))
        return self._longest

    def _frames(self, images: Sequence) -> tuple:
        """The images at the engine's serving budget (as ``generate`` and ``score`` size them)."""
        return self._sized(Request(None, "", tuple(images))).images

    def _inputs(self, turns: Turns, images: Sequence, reply: str):
        prompt = self.render(turns, reply=reply)
        return self.processor(text=[prompt], images=list(images) or None, return_tensors="pt").to(self.model.device)

    # ------------------------------------------------------------------ completions
    def complete(self, turns: Turns, images: Sequence, options: GenerationOptions = GenerationOptions(), *,
                 prefill: str = "", stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, deadline: float | None = None) -> Completion:
        """One assistant reply to a conversation, with its token counts and why it ended.

        Args:
            turns, images: the conversation (the last turn is the user's).
            options: decoding options (as :meth:`generate`).
            prefill: assistant text the reply continues (the model starts after it).
            stop: stop sequences; the reply ends before the first one and does not contain it.
            on_text: called on the model thread with each new piece of text as it is decoded (streaming).
            should_stop: polled after every token; ``True`` ends the reply (``finish_reason "length"``).
            deadline: ``time.monotonic()`` value after which decoding stops (``finish_reason "length"``).
        """
        torch = self._torch
        model = self._live()
        kwargs = self._generation_kwargs(options)
        checks = [c for c in (should_stop, deadline and (lambda: time.monotonic() > deadline)) if c]
        watch = _Watch(self.processor.tokenizer, stop, on_text, (lambda: any(c() for c in checks)) if checks else None)
        kwargs["stopping_criteria"] = [watch]
        seed = options.seed if options.temperature > 0 else None
        images = self._frames(images)
        lone = not prefill and len(turns) == 1 and turns[0][0] == "user" and self.prefix_cache.enabled
        with self._lock, torch.inference_mode(), self._seeded(seed):
            if lone:
                self._generate_cached(Request(None, turns[0][1], tuple(images)), kwargs)
                prompt_tokens = watch.start
            else:
                inputs = self._inputs(turns, images, prefill)
                model.generate(**inputs, **kwargs)
                prompt_tokens = int(inputs["input_ids"].shape[1])
        new = watch.new
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        text, hit_stop = stable_text(text, stop) if stop else (text, False)
        ended = bool(new) and new[-1] in self.eos_ids()
        if on_text is not None and len(text) > len(watch.shown):
            on_text(text[len(watch.shown):])
        finish = "stop" if (ended or hit_stop) and not watch.interrupted else "length"
        return Completion(text, int(prompt_tokens or 0), len(new), finish)

    # ------------------------------------------------------------------ teacher-forced traces
    def trace(self, turns: Turns, images: Sequence, head: str, tail: str = "", *, top_k: int = 0,
              all_positions: bool = False) -> Trace:
        """Log-probs of the tokens of ``tail`` after the prompt and the assistant text ``head`` (one forward).

        ``all_positions`` also reads every prompt position (for ``prompt_logprobs``); ``next_top`` is the top-k
        distribution of the token after ``head + tail``. Raw model distribution: no temperature or top-p.
        """
        torch = self._torch
        model = self._live()
        images = self._frames(images)
        with self._lock, torch.inference_mode():
            inputs = self._inputs(turns, images, head + tail)
            ids = inputs["input_ids"][0].tolist()
            if tail:
                head_ids = self._inputs(turns, images, head)["input_ids"][0].tolist()
                start = next((i for i, (a, b) in enumerate(zip(ids, head_ids)) if a != b),
                             min(len(ids), len(head_ids)))
            else:
                start = len(ids)
            first = 1 if all_positions else max(1, start)
            keep = len(ids) - first + 1  # logits for positions first-1 .. len-1
            logp = torch.log_softmax(model(**inputs, logits_to_keep=keep).logits[0].float(), dim=-1)
        offset = len(ids) - keep
        out = Trace(ids, start, {}, {}, {}, [])
        k = max(0, min(top_k, logp.shape[-1]))
        for pos in range(first, len(ids)):
            row = logp[pos - 1 - offset]
            out.logprobs[pos] = float(row[ids[pos]])
            out.ranks[pos] = int((row > row[ids[pos]]).sum()) + 1
            if k:
                vals, idx = row.topk(k)
                out.tops[pos] = list(zip(idx.tolist(), vals.tolist()))
        if k:
            vals, idx = logp[-1].topk(k)
            out.next_top = list(zip(idx.tolist(), vals.tolist()))
        return out

    def token_text(self, token_id: int) -> str:
        """The text of one token (special tokens kept)."""
        return self.processor.tokenizer.decode([token_id], skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of a token (a piece of a multi-byte character stays a piece, as OpenAI's ``bytes``)."""
        piece = self.processor.tokenizer.convert_ids_to_tokens(token_id)
        table = _byte_decoder()
        if isinstance(piece, str) and piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return self.token_text(token_id).encode("utf-8")



__all__ = ["Completion", "HFTokens", "Trace", "Turns", "stable_text"]
