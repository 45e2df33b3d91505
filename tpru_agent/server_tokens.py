"""Token-level answers for ``tpru serve``: ``logprobs``, ``top_logprobs``, ``prompt_logprobs`` and prefilled turns.

The engine protocol (``generate`` / ``score``) has no tokens, so these OpenAI / vLLM features need an engine that
exposes a transformers model: ``model``, ``processor`` and ``chat_text(request, reply=...)`` (the hf engine). For
such an engine this module runs one teacher-forced forward pass over the prompt plus the assistant text and reads
the log-softmax at every position (raw model distribution: no temperature or top-p applied), and continues a
prefilled assistant turn with ``model.generate``. Other engines answer these fields with a 400 that points at
``tpru_score``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .engines.base import GenerationOptions, Request


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


class TokenAccess:
    """Token-level reads of an hf-style engine (see the module doc). Build with :meth:`of`."""

    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def of(cls, engine) -> "TokenAccess | None":
        """An adapter when ``engine`` exposes ``model``, ``processor`` and ``chat_text``; else ``None``."""
        ok = all(hasattr(engine, a) for a in ("model", "processor", "chat_text"))
        return cls(engine) if ok else None

    @property
    def tokenizer(self):
        return self.engine.processor.tokenizer

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _inputs(self, request: Request, reply: str):
        prompt = self.engine.chat_text(request, reply=reply)
        images = list(request.images) or None
        return self.engine.processor(text=[prompt], images=images, return_tensors="pt").to(self.engine.model.device)

    def trace(self, request: Request, head: str, tail: str = "", *, top_k: int = 0,
              all_positions: bool = False) -> Trace:
        """Log-probs of the tokens of ``tail`` after the prompt and the assistant text ``head`` (one forward).

        ``all_positions`` also reads every prompt position (for ``prompt_logprobs``); ``next_top`` is the top-k
        distribution of the token after ``head + tail``.
        """
        import torch

        model = self.engine.model
        inputs = self._inputs(request, head + tail)
        ids = inputs["input_ids"][0].tolist()
        if tail:
            head_ids = self._inputs(request, head)["input_ids"][0].tolist()
            start = next((i for i, (a, b) in enumerate(zip(ids, head_ids)) if a != b), min(len(ids), len(head_ids)))
        else:
            start = len(ids)
        first = 1 if all_positions else max(1, start)
        keep = len(ids) - first + 1  # logits for positions first-1 .. len-1
        with torch.inference_mode():
            logits = model(**inputs, logits_to_keep=keep).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        offset = len(ids) - keep
        out = Trace(ids, start, {}, {}, {}, [])
        k = max(0, min(top_k, logp.shape[-1]))
        for pos in range(first, len(ids)):
            row = logp[pos - 1 - offset]
            value = float(row[ids[pos]])
            out.logprobs[pos] = value
            out.ranks[pos] = int((row > row[ids[pos]]).sum()) + 1
            if k:
                vals, idx = row.topk(k)
                out.tops[pos] = list(zip(idx.tolist(), vals.tolist()))
        if k:
            vals, idx = logp[-1].topk(k)
            out.next_top = list(zip(idx.tolist(), vals.tolist()))
        return out

    def eos_ids(self) -> set[int]:
        """Token ids that end the assistant turn."""
        eos = self.engine.model.generation_config.eos_token_id
        ids = set(eos) if isinstance(eos, (list, tuple)) else set() if eos is None else {eos}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int):
            ids.add(im_end)
        return ids

    def continue_reply(self, request: Request, prefill: str, options: GenerationOptions) -> tuple[str, bool]:
        """Generate after a prefilled assistant turn. Returns the new text and whether it stopped at max tokens."""
        import torch

        model, tok = self.engine.model, self.tokenizer
        inputs = self._inputs(request, prefill)
        eos = sorted(self.eos_ids())
        kwargs = dict(max_new_tokens=options.max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                      repetition_penalty=1.0)
        if options.temperature > 0:
            kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            if options.seed is not None:
                torch.manual_seed(options.seed)
            out = model.generate(**inputs, **kwargs)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        hit_eos = bool(new) and new[-1] in eos
        text = tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text, (not hit_eos and len(new) >= options.max_new_tokens)

    # ------------------------------------------------------------------ OpenAI / vLLM shapes
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of a token (a piece of a multi-byte character stays a piece, as OpenAI's ``bytes``)."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        table = _byte_decoder()
        if isinstance(piece, str) and piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return self.token_text(token_id).encode("utf-8")

    def entry(self, token_id: int, logprob: float) -> dict:
        """One OpenAI logprob item: ``token``, ``logprob``, ``bytes``."""
        return {"token": self.token_text(token_id), "logprob": logprob, "bytes": list(self.token_bytes(token_id))}

    def content_logprobs(self, trace: Trace, top_k: int) -> list[dict]:
        """OpenAI ``choices[0].logprobs.content`` for the traced tokens."""
        items = []
        for pos in range(trace.start, len(trace.ids)):
            item = self.entry(trace.ids[pos], trace.logprobs[pos])
            item["top_logprobs"] = [self.entry(i, v) for i, v in trace.tops.get(pos, [])[:top_k]]
            items.append(item)
        return items

    def prompt_logprobs(self, trace: Trace, top_k: int) -> list[dict | None]:
        """vLLM ``prompt_logprobs``: ``None``, then ``{token_id: {logprob, rank, decoded_token}}`` per token."""
        out: list[dict | None] = [None]
        for pos in range(1, len(trace.ids)):
            entry = {str(trace.ids[pos]): {"logprob": trace.logprobs[pos], "rank": trace.ranks[pos],
                                           "decoded_token": self.token_text(trace.ids[pos])}}
            for rank, (i, v) in enumerate(trace.tops.get(pos, [])[:top_k], 1):
                entry.setdefault(str(i), {"logprob": v, "rank": rank, "decoded_token": self.token_text(i)})
            out.append(entry)
        return out


__all__ = ["TokenAccess", "Trace"]
