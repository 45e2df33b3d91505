"""ONNX export of a Qwen2.5-VL / TPRU checkpoint as three graphs plus a manifest (``tpru export --format onnx``).

optimum-onnx has no Qwen2.5-VL exporter (and pins transformers < 4.58), and the dynamo exporter fails on the
vision tower's data-dependent window index, so the parts are traced with the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``), the split onnxruntime-genai uses:

- ``vision.onnx``: one RGB frame (``uint8 [H, W, 3]``, the fixed frame size of the export) -> ``image_embeds
  [tokens, hidden]``. Normalisation and patching are in the graph, so the runtime only resizes frames.
- ``embed.onnx``: ``input_ids [B, S]`` -> ``inputs_embeds [B, S, hidden]``.
- ``decoder.onnx``: ``inputs_embeds``, 3-axis M-RoPE ``position_ids [3, B, S]``, ``attention_mask [B, past+S]``,
  ``logits_index [K]`` (the positions whose logits are wanted) and ``past_key_i / past_value_i`` -> ``logits
  [B, K, vocab]`` and ``present_key_i / present_value_i``.

The folder also gets the tokenizer / processor / config files and ``tpru_onnx.json`` (see
:func:`tpru_agent.onnx.manifest.read_manifest`).
Torch is imported inside the export functions only; reading a manifest needs nothing but the standard library.

Example:
    >>> from tpru_agent.onnx.export import export_onnx
    >>> folder = export_onnx("tpru-3b", "tpru-3b-onnx", int8=True)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

from tpru_agent.errors import ConfigError, require
from tpru_agent.fsutil import atomic_dir, write_json
from tpru_agent.hub import ONNX_MANIFEST
from tpru_agent.onnx.manifest import FORMAT, FORMAT_VERSION, GRAPHS, read_manifest
from tpru_agent.sizing import TRAINED_FACTOR, TRAINED_MAX, TRAINED_MIN, PixelBudget, budget_size, serving_budget

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: Protobuf's hard limit; graphs above it keep their weights in one ``<graph>.onnx.data`` file next to them.
PROTOBUF_LIMIT = 2 * 1024**3
#: Files copied from the source folder next to the graphs (tokenizer, chat template, processor and model config).
PROCESSOR_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json", "tpru_budget.json",
    "video_preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


# ------------------------------------------------------------------------------------------ frame size
def parse_frame_size(text: str | tuple[int, int] | None, *, max_pixels: int = TRAINED_MAX,
                     factor: int = TRAINED_FACTOR) -> tuple[int, int]:
    """``"224x168"`` / ``(224, 168)`` / ``None`` -> ``(width, height)``, both multiples of ``factor``.

    ``None`` picks the square a large square frame is served at under this budget (TPRU's 36,864 px -> 196x196,
    49 visual tokens, as training sized a 224x224 frame): the vision graph has one fixed grid, and a square
    distorts portrait (GUI) and landscape (robot) frames alike.

    Raises:
        ConfigError: malformed text, or sides that are not positive multiples of ``factor``.
    """
    if text is None:
        side = budget_size(4096, 4096, PixelBudget(min_pixels=min(max_pixels, TRAINED_MIN), max_pixels=max_pixels,
                                                   factor=factor))[0]
        return side, side
    if isinstance(text, str):
        parts = text.lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"frame size must look like WIDTHxHEIGHT (e.g. 224x168), got {text!r}")
        text = (int(parts[0]), int(parts[1]))
    width, height = (int(v) for v in text)
    if width <= 0 or height <= 0 or width % factor or height % factor:
        raise ConfigError(f"frame size {width}x{height}: both sides must be positive multiples of {factor} "
                          f"(patch 14 x merge 2), e.g. 168x168, 196x168, 224x168")
    return width, height


def _versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ------------------------------------------------------------------------------------------ export
def export_onnx(model: str | os.PathLike, out: str | os.PathLike, *, int8: bool = False,
                frame_size: str | tuple[int, int] | None = None, opset: int = DEFAULT_OPSET,
                external_data: bool | None = None, overwrite: bool = False,
                on_step: Callable[[str], None] | None = None) -> Path:
    """Export ``model`` to ONNX graphs in ``out`` (written in a temporary sibling folder, then renamed).

    Args:
        model: a name, Hub id or local folder (see :mod:`tpru_agent.hub`).
        out: the export folder; must not exist unless ``overwrite``.
        int8: also quantise the decoder with ONNX Runtime dynamic int8 quantisation (the vision graph stays
            fp32; :func:`quantize_onnx` takes ``graphs=("decoder", "vision")`` for both).
        frame_size: ``(width, height)`` or ``"WxH"`` every frame is resized to (multiples of 28); default the
            square a large square frame is served at under the model's budget (:func:`parse_frame_size`; 196x196
            at TPRU's).
        opset: ONNX opset.
        external_data: keep weights in ``<graph>.onnx.data`` files; default only for graphs over 2 GB.
        overwrite: replace an existing ``out``.
        on_step: called with a short description before each step (the CLI shows it).

    Returns:
        The export folder.

    Raises:
        ConfigError: ``out`` exists (without ``overwrite``), a bad frame size, or a model that is not Qwen2.5-VL.
        ModelNotFoundError: the model cannot be found.
        EngineUnavailableError: torch / transformers / onnx are not installed.
    """
    step = on_step or (lambda text: log.info("%s", text))
    target, source = _export_paths(model, out, overwrite)
    torch = require("torch", "hf", what="ONNX export")
    require("onnx", "onnx", what="ONNX export")
    transformers = require("transformers", "hf", what="ONNX export")
    config = transformers.AutoConfig.from_pretrained(source)
    if getattr(config, "model_type", None) != "qwen2_5_vl":
        raise ConfigError(f"ONNX export supports Qwen2.5-VL checkpoints; {str(model)!r} is "
                          f"{getattr(config, 'model_type', 'unknown')!r}")
    preproc = json.loads((source / "preprocessor_config.json").read_text(encoding="utf-8"))
    merge, patch = config.vision_config.spatial_merge_size, config.vision_config.patch_size
    size = parse_frame_size(frame_size, max_pixels=serving_budget(source).max_pixels, factor=patch * merge)

    step(f"loading {model} (float32, eager attention)")
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(
        source, dtype=torch.float32, attn_implementation="eager", use_safetensors=True, local_files_only=True).eval()
    with atomic_dir(target) as tmp:
        graphs = _trace_graphs(hf_model, preproc, size, tmp / "raw", opset, step)
        n_params = sum(p.numel() for p in hf_model.parameters())
        del hf_model
        for name, info in graphs.items():
            step(f"saving {name}.onnx")
            info.update(_save_graph(tmp / "raw" / name / f"{name}.onnx", tmp / f"{name}.onnx", external_data))
        shutil.rmtree(tmp / "raw")
        copied = [f for f in PROCESSOR_FILES if (source / f).is_file()]
        for f in copied:
            shutil.copy2(source / f, tmp / f)
        write_json(tmp / ONNX_MANIFEST, _manifest(model, source, config, opset, size, graphs, copied, n_params))
        if int8:
            step("quantising to int8 (ONNX Runtime dynamic quantisation)")
            _quantize_in_place(tmp)
    log.info("exported %s to %s", model, target)
    return target


def _export_paths(model, out, overwrite: bool) -> tuple[Path, Path]:
    """``(target, source)``: the export folder and the model folder, checked not to clash.

    Raises:
        ConfigError: ``out`` exists (without ``overwrite``), is or holds the source, or holds other files.
    """
    target = Path(out).expanduser().resolve()
    if target.exists() and not overwrite:
        raise ConfigError(f"export folder {str(target)!r} already exists; pass overwrite=True (CLI: --overwrite) "
                          "or choose another --out")
    from tpru_agent.hub import locate

    source = locate(model).resolve()
    if target == source or target in source.parents:
        raise ConfigError(f"export folder {str(target)!r} is (or holds) the source model {str(source)!r}; "
                          "choose another --out")
    if target.exists() and any(target.iterdir()) and not (target / ONNX_MANIFEST).is_file():
        raise ConfigError(f"export folder {str(target)!r} holds files that are not an ONNX export; --overwrite "
                          "replaces only an earlier export or an empty folder")
    return target, source


def _trace_graphs(hf_model, preproc: dict, size: tuple[int, int], raw: Path, opset: int,
                  step: Callable[[str], None]) -> dict[str, dict]:
    """Trace the three graphs into ``raw/<name>/<name>.onnx`` (one folder each: large graphs spill weight files)."""
    import torch

    from tpru_agent.onnx.trace import trace_decoder, trace_embed, trace_vision

    width, height = size
    paths = {name: raw / name / f"{name}.onnx" for name in GRAPHS}
    for path in paths.values():
        path.parent.mkdir(parents=True)
    graphs: dict[str, dict] = {}
    # The tracer warns that the grid-dependent index tensors become constants: that is the design.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step(f"tracing the vision encoder for {width}x{height} frames")
        graphs["vision"] = trace_vision(hf_model, preproc, width, height, paths["vision"], opset)
        step("tracing the token embedding")
        graphs["embed"] = trace_embed(hf_model, paths["embed"], opset)
        step("tracing the decoder (inputs_embeds, M-RoPE positions, KV cache)")
        graphs["decoder"] = trace_decoder(hf_model, paths["decoder"], opset)
    return graphs


def _manifest(model, source: Path, config, opset: int, size: tuple[int, int], graphs: dict, copied: list[str],
              n_params: int) -> dict:
    """The ``tpru_onnx.json`` an fp32 export starts with (see :func:`tpru_agent.onnx.manifest.read_manifest`)."""
    width, height = size
    patch, merge = config.vision_config.patch_size, config.vision_config.spatial_merge_size
    text = config.text_config
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "source_model": str(model), "source_folder": str(source),
        "opset": opset, "precision": "fp32", "quantized_graphs": [],
        "frame": {"width": width, "height": height, "grid_thw": [1, height // patch, width // patch],
                  "tokens": (height // patch) * (width // patch) // merge**2},
        "text": {"hidden_size": text.hidden_size, "num_layers": text.num_hidden_layers,
                 "num_kv_heads": text.num_key_value_heads,
                 "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                 "vocab_size": text.vocab_size},
        "spatial_merge_size": merge,
        "token_ids": {"image": config.image_token_id, "video": config.video_token_id,
                      "vision_start": config.vision_start_token_id, "vision_end": config.vision_end_token_id},
        "parameters": n_params, "graphs": graphs, "processor_files": copied,
        "exported_with": _versions("torch", "transformers", "onnx", "onnxruntime"),
    }


def _save_graph(src: Path, dst: Path, external_data: bool | None) -> dict:
    """Move a traced graph into place, with its weights in one external file when large (or asked)."""
    import onnx

    leftovers = [p for p in src.parent.iterdir() if p != src]
    size = sum(p.stat().st_size for p in [src, *leftovers])
    external = size > PROTOBUF_LIMIT * 0.95 if external_data is None else external_data
    if not external and not leftovers:
        shutil.move(src, dst)  # a move inside the staging folder; atomic_dir publishes the whole folder
        return {"file": dst.name, "data": [], "bytes": dst.stat().st_size}
    graph = onnx.load(str(src), load_external_data=True)
    data = dst.name + ".data"
    if external:
        onnx.save_model(graph, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                        size_threshold=1024)
    else:
        onnx.save_model(graph, str(dst))
    for p in [src, *leftovers]:
        p.unlink()
    files = [data] if external else []
    return {"file": dst.name, "data": files, "bytes": sum((dst.parent / f).stat().st_size for f in [dst.name, *files])}


def quantize_onnx(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                  graphs: tuple[str, ...] = ("decoder",)) -> Path:
    """Write an int8 copy of an fp32 export folder (ONNX Runtime dynamic quantisation of ``graphs``).

    Raises:
        ConfigError: ``out`` exists (without ``overwrite``) or ``src`` is already quantised.
    """
    manifest = read_manifest(src)
    if manifest["precision"] != "fp32":
        raise ConfigError(f"{str(src)!r} is already {manifest['precision']}; quantise an fp32 export")
    target = Path(out).expanduser().resolve()
    if target.exists() and not overwrite:
        raise ConfigError(f"folder {str(target)!r} already exists; pass overwrite=True or choose another folder")
    with atomic_dir(target) as tmp:
        for item in Path(src).iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        _quantize_in_place(tmp, graphs)
    return target


def _quantize_in_place(folder: Path, graphs: tuple[str, ...] = ("decoder",)) -> None:
    """Replace the fp32 ``graphs`` of an export folder by int8 ones and update the manifest."""
    quant = require("onnxruntime.quantization", "onnx", what="int8 quantisation")
    manifest = json.loads((folder / ONNX_MANIFEST).read_text(encoding="utf-8"))
    for name in graphs:
        info = manifest["graphs"][name]
        src = folder / info["file"]
        dst = folder / f"{name}.int8.onnx"
        big = info["bytes"] / 4 > PROTOBUF_LIMIT * 0.95
        # Weights only (MatMulConstBOnly): quantising activation x activation products (attention scores)
        # costs accuracy for little speed. ORT logs advice through the root logger; keep it out of the CLI.
        root = logging.getLogger()
        root.addFilter(_drop_preprocess_advice)
        try:
            quant.quantize_dynamic(str(src), str(dst), weight_type=quant.QuantType.QInt8, per_channel=False,
                                   use_external_data_format=big, extra_options={"MatMulConstBOnly": True})
        finally:
            root.removeFilter(_drop_preprocess_advice)
        for f in [info["file"], *info.get("data", [])]:
            (folder / f).unlink()
        data = [p.name for p in folder.iterdir() if p.name.startswith(dst.name) and p.name != dst.name]
        manifest["graphs"][name] = dict(info, file=dst.name, data=data,
                                        bytes=sum((folder / f).stat().st_size for f in [dst.name, *data]))
    manifest["precision"] = "int8"
    manifest["quantized_graphs"] = list(graphs)
    write_json(folder / ONNX_MANIFEST, manifest)


def _drop_preprocess_advice(record: logging.LogRecord) -> bool:
    """Drop ORT quantisation's chatter, which goes to the root logger (per-tensor notes, pre-processing advice)."""
    return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname.replace("\\", "/")
