"""The manifest of an ONNX export (``tpru_onnx.json``): what ``tpru export`` writes and the onnx engine reads.

Kept apart from both so the engine never imports the exporter (which needs torch) and the exporter never imports
an engine. Standard library only.

Example:
    >>> from tpru_agent.onnx.manifest import read_manifest
    >>> read_manifest("tpru-3b-onnx")["precision"]          # doctest: +SKIP
    'fp32'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tpru_agent.errors import ConfigError, ModelNotFoundError
from tpru_agent.hub import ONNX_MANIFEST

FORMAT = "tpru-onnx"
FORMAT_VERSION = 1
GRAPHS = ("vision", "embed", "decoder")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``tpru_onnx.json`` in an export folder; every graph file it names must exist.

    Raises:
        ModelNotFoundError: the folder, the manifest or a graph file is missing.
        ConfigError: the manifest is not valid JSON or is of another format / version.
    """
    root = Path(folder).expanduser()
    path = root / ONNX_MANIFEST
    if not root.is_dir():
        raise ModelNotFoundError(f"ONNX folder {str(root)!r} does not exist; create it with "
                                 f"`tpru export --model MODEL --format onnx --out {root}`")
    if not path.is_file():
        raise ModelNotFoundError(f"{str(root)!r} is not an ONNX export: it has no {ONNX_MANIFEST}. Create one with "
                                 f"`tpru export --model MODEL --format onnx --out DIR`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({exc}); re-run `tpru export`") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a {FORMAT} manifest; re-run `tpru export`")
    if manifest.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{str(path)!r} has format version {manifest.get('version')!r}, this tpru-agent reads "
                          f"version {FORMAT_VERSION}; re-export the model with this version")
    for name in GRAPHS:
        graph = manifest.get("graphs", {}).get(name)
        if not graph:
            raise ConfigError(f"{str(path)!r} names no {name!r} graph; re-run `tpru export`")
        for file in [graph["file"], *graph.get("data", [])]:
            if not (root / file).is_file():
                raise ModelNotFoundError(f"ONNX export {str(root)!r} is incomplete: {file!r} is missing; "
                                         "copy the whole folder or re-run `tpru export`")
    return manifest


__all__ = ["FORMAT", "FORMAT_VERSION", "GRAPHS", "ONNX_MANIFEST", "read_manifest"]
