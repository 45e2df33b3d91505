"""Token-level answers in OpenAI / vLLM shapes: ``logprobs.content``, ``top_logprobs``, ``prompt_logprobs``.

The numbers come from the hf engine's own token methods (:class:`tpru_agent.engines.hf_tokens.HFTokens`): one
teacher-forced pass over the prompt plus the reply (raw model distribution: no temperature or top-p applied).
"""

from __future__ import annotations

from tpru_agent.engines.hf_tokens import HFTokens, Trace


def entry(engine: HFTokens, token_id: int, logprob: float) -> dict:
    """One OpenAI logprob item: ``token``, ``logprob``, ``bytes``."""
    return {"token": engine.token_text(token_id), "logprob": logprob, "bytes": list(engine.token_bytes(token_id))}


def content_logprobs(engine: HFTokens, trace: Trace, top_k: int) -> list[dict]:
    """OpenAI ``choices[0].logprobs.content`` for the traced tokens."""
    items = []
    for pos in range(trace.start, len(trace.ids)):
        item = entry(engine, trace.ids[pos], trace.logprobs[pos])
        item["top_logprobs"] = [entry(engine, i, v) for i, v in trace.tops.get(pos, [])[:top_k]]
        items.append(item)
    return items


def prompt_logprobs(engine: HFTokens, trace: Trace, top_k: int) -> list[dict | None]:
    """vLLM ``prompt_logprobs``: ``None``, then ``{token_id: {logprob, rank, decoded_token}}`` per token."""
    out: list[dict | None] = [None]
    for pos in range(1, len(trace.ids)):
        item = {str(trace.ids[pos]): {"logprob": trace.logprobs[pos], "rank": trace.ranks[pos],
                                      "decoded_token": engine.token_text(trace.ids[pos])}}
        for rank, (i, v) in enumerate(trace.tops.get(pos, [])[:top_k], 1):
            item.setdefault(str(i), {"logprob": v, "rank": rank, "decoded_token": engine.token_text(i)})
        out.append(item)
    return out


__all__ = ["content_logprobs", "entry", "prompt_logprobs"]
