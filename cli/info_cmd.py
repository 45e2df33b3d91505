"""``tpru env`` (versions, devices, importable engines and extras) and ``tpru models`` (known names, cache state).

Only click, rich and the standard library load at import; torch loads inside ``tpru env`` when it is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import click

from tpru_agent.cli import render
from tpru_agent.errors import install_hint


def _engine_fix(engine: str) -> str:
    """"no: <how to install it>" for an engine of ``tpru env`` whose modules are not all importable."""
    from tpru_agent.cli.main import EXTRA_OF

    missing = next(m for m in ENGINE_MODULES[engine] if importlib.util.find_spec(m) is None)
    extra = EXTRA_OF.get(missing)
    return f"no: {install_hint(extra)}" if extra else f"no: {missing!r} is missing; reinstall tpru-agent"


ENGINE_MODULES = {
    "hf": ["torch", "transformers", "qwen_vl_utils"],
    "quant (4bit/8bit)": ["bitsandbytes"],
    "onnx": ["onnxruntime", "tokenizers"],
    "onnx export": ["onnx", "torch", "transformers"],
    "openai / serve": ["openai", "fastapi", "uvicorn"],
    "finetune": ["trl", "peft", "datasets"],
    "classic": ["cv2", "numpy"],
}
VERSIONED = ["tpru-agent", "torch", "torchvision", "transformers", "qwen-vl-utils", "accelerate", "bitsandbytes",
             "onnxruntime", "onnxruntime-gpu", "tokenizers", "onnx", "trl", "peft", "datasets", "openai", "fastapi",
             "uvicorn", "opencv-python-headless", "numpy", "pillow"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_cmd(as_json):
    """Versions, devices, and which engines and extras can import here."""
    from tpru_agent.engines.ort_setup import runtime_facts

    engines = {name: all(importlib.util.find_spec(m) is not None for m in mods)
               for name, mods in ENGINE_MODULES.items()}
    devices = {"cpu": True}
    if engines["hf"]:
        import torch

        devices["cuda"] = torch.cuda.is_available()
        if devices["cuda"]:
            devices["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    facts = {"python": platform.python_version(), "platform": platform.platform(),
             "versions": {d: _version(d) for d in VERSIONED}, "engines": engines, "devices": devices,
             "onnxruntime": runtime_facts()}
    if as_json:
        render.emit_json(facts)
        return
    render.show_table("Versions", ["package", "version"], [[k, v] for k, v in facts["versions"].items()])
    render.show_table("Engines and extras", ["engine", "importable"],
                      [[k, "yes" if v else _engine_fix(k)] for k, v in engines.items()])
    render.show_table("Devices", ["device", "available"], [[k, v] for k, v in devices.items()])
    ort = facts["onnxruntime"]
    render.show_table("ONNX Runtime", ["distribution", "version"],
                      [[k, v or "-"] for k, v in ort["distributions"].items()]
                      + [["providers", ", ".join(ort["providers"]) or "-"]])
    if ort["problem"]:
        render.warn(ort["problem"])


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def models_cmd(as_json):
    """Known model names, what they point to, and whether their weights are in the local cache."""
    from tpru_agent.hub import (
        ALIASES,
        PACKAGED,
        SIZES,
        cache_dir,
        cache_state,
        download_command,
        is_shipped,
        packaged_folder,
    )

    rows = []
    for name, hub_id in ALIASES.items():
        state = cache_state(name)
        rows.append({"name": name, "hub_id": hub_id, "state": state, "size": SIZES.get(hub_id),
                     "download": None if state in ("cached", "local") else f"hf download {hub_id}"})
    for name in PACKAGED:
        shipped = is_shipped(packaged_folder(name))
        rows.append({"name": name, "hub_id": "(shipped with the package)", "state": "packaged" if shipped
                     else "not shipped in this install", "size": None, "download": None})
    rows.append({"name": "classic", "hub_id": "(no weights)", "state": "built in", "size": None, "download": None})
    if as_json:
        render.emit_json({"cache_dir": str(cache_dir()), "models": rows})
        return
    render.show_table(f"Models (cache: {cache_dir()})", ["name", "hub id", "state", "get it with"],
                      [[r["name"], r["hub_id"], r["state"],
                        download_command(r["hub_id"]) if r["download"] else "-"] for r in rows])
    render.note("`hf download` comes with the [hf] extra (huggingface_hub); it fills the cache above, which "
                "HF_HOME / HF_HUB_CACHE move. Any folder holding config.json and *.safetensors works as --model DIR.")
