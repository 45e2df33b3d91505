"""Torch modules wrapping Qwen2.5-VL's parts for the TorchScript ONNX exporter (used by :mod:`tpru_agent.onnx.export`).

Imports torch at module level: import it only inside an export.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache


class VisionGraph(torch.nn.Module):
    """One ``uint8 [H, W, 3]`` RGB frame -> merged visual tokens, for one fixed frame size.

    Does what the Qwen2-VL image processor does to a frame already at the target size (rescale and normalise,
    fused the same way; patch, repeat over the temporal patch) and runs the vision tower. The grid is fixed at
    trace time, so the window index, attention splits and rotary positions become constants of the graph.
    """

    def __init__(self, model, preproc: dict, width: int, height: int):
        super().__init__()
        self.visual = model.model.visual
        vc = model.config.vision_config
        self.patch, self.merge, self.temporal = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        self.gh, self.gw = height // self.patch, width // self.patch
        scale = float(preproc.get("rescale_factor", 1 / 255))
        mean = torch.tensor(preproc.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), dtype=torch.float32)
        std = torch.tensor(preproc.get("image_std", [0.26862954, 0.26130258, 0.27577711]), dtype=torch.float32)
        # The processor fuses rescale into normalise: (x - mean / scale) / (std / scale).
        self.register_buffer("mean", (mean / scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", (std / scale).view(1, 3, 1, 1), persistent=False)
        self.grid = torch.tensor([[1, self.gh, self.gw]])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        p, m, t, gh, gw = self.patch, self.merge, self.temporal, self.gh, self.gw
        x = pixels.to(torch.float32).permute(2, 0, 1).unsqueeze(0)
        x = (x - self.mean) / self.std
        x = x.reshape(1, 3, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1).reshape(gh * gw, 3 * t * p * p)
        return self.visual(x, grid_thw=self.grid).pooler_output


class EmbedGraph(torch.nn.Module):
    """``input_ids [B, S]`` -> ``inputs_embeds [B, S, hidden]``."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class DecoderGraph(torch.nn.Module):
    """The language model over ``inputs_embeds`` with explicit M-RoPE positions and a KV cache in and out."""

    def __init__(self, model):
        super().__init__()
        self.lm = model.model.language_model
        self.head = model.lm_head
        self.n_layers = self.lm.config.num_hidden_layers

    def forward(self, inputs_embeds, position_ids, attention_mask, logits_index, *past):
        cache = DynamicCache(config=self.lm.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.lm(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                      cache=cache, use_cache=True)
        # Only the asked positions go through the head: a prefill never materialises [S, vocab] logits.
        logits = self.head(out.last_hidden_state.index_select(1, logits_index))
        presents = []
        for i in range(self.n_layers):
            presents += [cache.layers[i].keys, cache.layers[i].values]
        return (logits, *presents)


def _export(module, args, path: Path, opset: int, inputs, outputs, dynamic) -> dict:
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                      opset_version=opset, dynamo=False, do_constant_folding=True)
    return {"inputs": inputs, "outputs": outputs}


def trace_vision(model, preproc: dict, width: int, height: int, path: Path, opset: int) -> dict:
    """Export :class:`VisionGraph` for ``width x height`` frames."""
    module = VisionGraph(model, preproc, width, height).eval()
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return _export(module, (pixels,), path, opset, ["pixels"], ["image_embeds"], None)


def trace_embed(model, path: Path, opset: int) -> dict:
    """Export :class:`EmbedGraph` with dynamic batch and length."""
    ids = torch.zeros((1, 4), dtype=torch.long)
    return _export(EmbedGraph(model).eval(), (ids,), path, opset, ["input_ids"], ["inputs_embeds"],
                   {"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}})


def decoder_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder graph."""
    past = [f"past_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "position_ids", "attention_mask", "logits_index", *past], ["logits", *present]


def trace_decoder(model, path: Path, opset: int) -> dict:
    """Export :class:`DecoderGraph`; traced with a non-empty past so the past length stays a dynamic axis."""
    module = DecoderGraph(model).eval()
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    batch, past_len, seq = 1, 3, 5
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, seq, text.hidden_size, generator=gen)
    positions = (torch.arange(seq) + past_len).view(1, 1, seq).expand(3, batch, seq).contiguous()
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    index = torch.arange(seq)
    past = [torch.randn(batch, text.num_key_value_heads, past_len, head_dim, generator=gen)
            for _ in range(2 * module.n_layers)]
    inputs, outputs = decoder_names(module.n_layers)
    dynamic = {"inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": {1: "batch", 2: "seq"},
               "attention_mask": {0: "batch", 1: "total"}, "logits_index": {0: "n_logits"},
               "logits": {0: "batch", 1: "n_logits"}}
    dynamic.update({name: {0: "batch", 2: "past"} for name in inputs[4:]})
    dynamic.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
    return _export(module, (embeds, positions, mask, index, *past), path, opset, inputs, outputs, dynamic)
