"""Model names -> weights on disk: aliases, Hub ids, local folders, packaged models; safetensors only.

``"tpru-3b"`` -> ``Stephengzk/TPRU-3B``; ``"qwen2.5-vl-3b"`` -> ``Qwen/Qwen2.5-VL-3B-Instruct``; ``"tpru-nano"`` ->
the folder shipped inside the package (:data:`PACKAGED_DIR`); a local folder is used as it is; any other
``owner/name`` is a Hub id. Nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tpru_agent.errors import EngineUnavailableError, ModelNotFoundError, close_matches, require

ALIASES: dict[str, str] = {
    "tpru-3b": "Stephengzk/TPRU-3B",
    "tpru-7b": "Stephengzk/TPRU-7B",
    "tpru-32b": "Stephengzk/TPRU-32B",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
}
DEFAULT_MODEL = "tpru-3b"
#: Models shipped inside the package: name -> folder under :data:`PACKAGED_DIR` (hf weights, and the ONNX export
#: in its ``onnx/`` sub-folder).
PACKAGED: dict[str, str] = {"tpru-nano": "tpru-nano"}
PACKAGED_DIR = Path(__file__).resolve().parent / "models"
#: The sub-folder of a packaged model that holds its ``tpru export --format onnx`` output.
ONNX_SUBDIR = "onnx"
#: The packaged model's machine-readable card; ``{"default_fallback": true}`` makes it the CLI's fallback.
PACKAGED_CARD = "tpru_nano.json"
#: Download sizes of the bf16 safetensors, for messages (parameters x 2 bytes).
SIZES: dict[str, str] = {"Stephengzk/TPRU-3B": "~7.5 GB", "Stephengzk/TPRU-7B": "~16.6 GB",
                         "Stephengzk/TPRU-32B": "~67 GB", "Qwen/Qwen2.5-VL-3B-Instruct": "~7.5 GB",
                         "Qwen/Qwen2.5-VL-7B-Instruct": "~16.6 GB", "Qwen/Qwen2.5-VL-32B-Instruct": "~67 GB"}
#: Files a Qwen2.5-VL folder needs; ``*.bin`` / pickles are never fetched (safetensors only).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken", "README.md"]
ONNX_MANIFEST = "tpru_onnx.json"


@dataclass(frozen=True)
class ModelRef:
    """What a model name means: ``kind`` is ``"local"``, ``"hub"`` or ``"classic"``."""

    name: str
    kind: str
    target: str  # local path or Hub id

    @property
    def is_onnx(self) -> bool:
        """A local folder written by ``tpru export --format onnx``."""
        return self.kind == "local" and (Path(self.target) / ONNX_MANIFEST).is_file()

    @property
    def packaged(self) -> bool:
        """A model shipped inside the package (``"tpru-nano"``)."""
        return self.kind == "local" and self.name.strip().lower() in PACKAGED

    @property
    def onnx_folder(self) -> Path | None:
        """The ONNX export to run: the folder itself, or its ``onnx/`` sub-folder (a packaged model's layout)."""
        if self.kind != "local":
            return None
        for folder in (Path(self.target), Path(self.target) / ONNX_SUBDIR):
            if (folder / ONNX_MANIFEST).is_file():
                return folder
        return None


def resolve(name: str | os.PathLike) -> ModelRef:
    """Interpret a model name without touching the network.

    Example:
        >>> resolve("tpru-7b").target
        'Stephengzk/TPRU-7B'
    """
    text = str(name).strip()
    if text.lower() == "classic":
        return ModelRef(text, "classic", "")
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelRef(text, "local", str(path.resolve()))
    if text.endswith("/") or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()):
        raise ModelNotFoundError(f"no local folder {text!r} (its parent exists here, so it was read as a path, not "
                                 "a Hub id); check the path")
    if text.lower() in ALIASES:
        return ModelRef(text, "hub", ALIASES[text.lower()])
    if text.lower() in PACKAGED:
        return ModelRef(text, "local", str(_packaged(text.lower())))
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists():
        return ModelRef(text, "hub", text)
    hint = close_matches(text.lower(), [*ALIASES, *PACKAGED])
    raise ModelNotFoundError(
        f"model {text!r} is neither a local folder nor a known name.{hint} Known names: "
        f"{', '.join([*ALIASES, *PACKAGED])}; "
        "or pass a folder holding config.json and *.safetensors, or a Hub id like owner/name."
    )


def packaged_folder(name: str) -> Path:
    """Where the packaged model ``name`` lives inside the installed package (it may be absent)."""
    return PACKAGED_DIR / PACKAGED[name.strip().lower()]


def is_shipped(folder: Path) -> bool:
    """A packaged model folder holding hf weights (config.json) or an ONNX export (``onnx/tpru_onnx.json``)."""
    return (folder / "config.json").is_file() or (folder / ONNX_SUBDIR / ONNX_MANIFEST).is_file()


def _packaged(name: str) -> Path:
    folder = packaged_folder(name)
    if not is_shipped(folder):
        raise ModelNotFoundError(
            f"{name!r} is not shipped with this install of tpru-agent: {str(folder)!r} holds no model (no config.json "
            f"and no {ONNX_SUBDIR}/{ONNX_MANIFEST}). Fix: install a release that ships it, use the real model "
            f"({download_command(ALIASES[DEFAULT_MODEL])}, then --model {DEFAULT_MODEL}), or the no-weights baseline "
            "'classic'")
    return folder


def choose_fallback(shipped: bool, card: object) -> str:
    """The model the CLI falls back to when the default model's weights are missing.

    ``"tpru-nano"`` when its packaged folder is shipped and its card (:data:`PACKAGED_CARD`, parsed JSON) says
    ``"default_fallback": true`` (written only when it measured better than classic on held-out tasks); else
    ``"classic"``. A card that is not a JSON object, or any value other than ``true``, means no.

    Example:
        >>> choose_fallback(True, {"default_fallback": True}), choose_fallback(True, {}), choose_fallback(False, None)
        ('tpru-nano', 'classic', 'classic')
    """
    return "tpru-nano" if shipped and isinstance(card, dict) and card.get("default_fallback") is True else "classic"


def fallback_model(root: Path | None = None) -> str:
    """:func:`choose_fallback` over the installed package's models folder (``root``: another one, for tests)."""
    import json

    folder = (root or PACKAGED_DIR) / PACKAGED["tpru-nano"]
    try:
        card = json.loads((folder / PACKAGED_CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        card = None  # no card, or an unreadable one: never the default
    return choose_fallback(is_shipped(folder), card)


#: What the CLI runs when the default model's weights are missing (and neither --model nor --strict is given).
FALLBACK_MODEL = fallback_model()


def cache_dir() -> Path:
    """Where Hub downloads live (``HF_HUB_CACHE`` / ``HF_HOME`` respected), without importing huggingface_hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set: only the local cache is used."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _check_folder(folder: Path, name: str) -> Path:
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        if not (folder / "adapter_model.safetensors").is_file():
            raise ModelNotFoundError(f"adapter folder {str(folder)!r} (from {name!r}) has no adapter_model.safetensors")
        return folder  # a LoRA adapter: the hf engine loads its base and applies it
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"model folder {str(folder)!r} (from {name!r}) has no config.json")
    if not any(folder.glob("*.safetensors")):
        _check_config(folder / "config.json", name)
        pickles = [p.name for p in folder.glob("*.bin")]
        extra = f" It has {pickles}: pickle weights are refused; convert them to safetensors." if pickles else ""
        raise ModelNotFoundError(f"model folder {str(folder)!r} (from {name!r}) has no *.safetensors weights.{extra}")
    check_model_files(folder, name)
    return folder


def check_model_files(folder: str | os.PathLike, name: str | None = None) -> None:
    """The checks every loader runs on a local model folder before ``from_pretrained`` reads it.

    Inference runs them through :func:`locate`, fine-tuning on its base before loading it: ``config.json`` names an
    architecture transformers ships (no code from the folder is ever run), and the weights are safetensors, not
    pickles (``*.bin``), even beside other safetensors files (an adapter, an extra tensor file). A folder without
    ``config.json`` (an adapter) is left to ``from_pretrained(use_safetensors=True)``.

    Raises:
        ModelNotFoundError: a remote-code or unreadable config, or ``*.bin`` weights without ``model.safetensors``
            (or its shard index).
    """
    folder = Path(folder)
    name = str(folder) if name is None else name
    if not (folder / "config.json").is_file():
        return
    _check_config(folder / "config.json", name)
    pickles = sorted(p.name for p in folder.glob("*.bin") if p.name != "training_args.bin")
    safe = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if pickles and not safe:
        raise ModelNotFoundError(f"model folder {str(folder)!r} (from {name!r}) has no model.safetensors weights. "
                                 f"It has {pickles}: pickle weights are refused; convert them to safetensors.")


#: Architectures the engines load without code from the model folder.
KNOWN_MODEL_TYPES = frozenset({"qwen2_5_vl", "qwen2_vl"})


def _check_config(file: Path, name: str) -> None:
    """A readable config.json of an architecture transformers ships (no remote code is ever run)."""
    import json

    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{str(file)!r} (from {name!r}) is not readable JSON ({exc}); the folder is not a "
                                 "usable model") from exc
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{str(file)!r} (from {name!r}) does not hold a model configuration")
    model_type = config.get("model_type")
    if config.get("auto_map") and model_type not in KNOWN_MODEL_TYPES:
        raise ModelNotFoundError(
            f"model folder {str(file.parent)!r} (from {name!r}) is a remote-code model (model_type "
            f"{model_type!r}, config.json 'auto_map'); tpru-agent runs Qwen2.5-VL checkpoints "
            f"({', '.join(sorted(KNOWN_MODEL_TYPES))}) and never executes code shipped in a model folder")


def locate(name: str | os.PathLike, *, revision: str | None = None, cache: str | os.PathLike | None = None,
           local_files_only: bool | None = None, inference: bool = True) -> Path:
    """A local folder with the model's config, processor files and safetensors weights.

    Hub names are looked up in the cache first and downloaded only when allowed (not ``HF_HUB_OFFLINE``).
    ``inference=False`` (training) leaves the no-weights classic engine out of the error's ways out.

    Raises:
        ModelNotFoundError: the name is unknown, or the weights are neither cached nor downloadable; the
            message names what was tried, the cache folder and the ways out.
    """
    ref = resolve(name)
    if ref.kind == "local":
        return _check_folder(Path(ref.target), ref.name)
    if ref.kind == "classic":
        raise ModelNotFoundError("'classic' is an engine without weights; use TPRU(engine='classic')")
    snapshot_download = require("huggingface_hub", "hf", what="loading model weights").snapshot_download

    only_local = offline() if local_files_only is None else local_files_only
    cache = cache or cache_dir()  # read the environment now, not at huggingface_hub's import
    try:
        folder = snapshot_download(ref.target, revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS,
                                   local_files_only=True)
    except Exception:  # not cached: fall through to a download when allowed
        folder = None
    if folder is None and not only_local:
        try:
            folder = snapshot_download(ref.target, revision=revision, cache_dir=cache,
                                       allow_patterns=ALLOW_PATTERNS, etag_timeout=10)
        except Exception as exc:
            raise ModelNotFoundError(_missing(ref, cache, f"download failed: {type(exc).__name__}: {exc}",
                                              inference)) from exc
    if folder is None:
        raise ModelNotFoundError(_missing(ref, cache, "not in the local cache and downloads are off "
                                          "(HF_HUB_OFFLINE is set)" if only_local and offline() else
                                          "not in the local cache (local_files_only)", inference))
    return _check_folder(Path(folder), ref.name)


def download_command(target: str) -> str:
    """The shell command that fetches a Hub model into the cache, with its size when known.

    Example:
        >>> download_command("Stephengzk/TPRU-3B")
        'hf download Stephengzk/TPRU-3B  (~7.5 GB)'
    """
    size = SIZES.get(target)
    return f"hf download {target}" + (f"  ({size})" if size else "")


def _missing(ref: ModelRef, cache, why: str, inference: bool = True) -> str:
    where = cache or cache_dir()
    why = " ".join(why.split())  # one line: the Hub's own messages span several
    size = f", {SIZES[ref.target]} of bf16 safetensors" if ref.target in SIZES else ""
    ways = [f"download them with `hf download {ref.target}`{size} (on a machine with access, then copy the cache "
            "here)", "or pass a local model folder"]
    if not offline():
        ways.append("set HF_HUB_OFFLINE=1 to use only the cache without trying the network")
    if inference:
        ways.append("or use the no-weights baseline: engine='classic' (CLI: --engine classic)")
    return (f"weights for {ref.name!r} ({ref.target}) are not available: {why}. Cache folder: {where}. "
            f"Fix: {'; '.join(ways)}.")


def cache_state(name: str) -> str:
    """``"local"``, ``"cached"`` or ``"missing"`` (never touches the network)."""
    try:
        ref = resolve(name)
    except ModelNotFoundError:
        return "missing"
    if ref.kind == "local":
        return "local"
    try:
        locate(name, local_files_only=True)
        return "cached"
    except (ModelNotFoundError, EngineUnavailableError):
        return "missing"
