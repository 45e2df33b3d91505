"""Engines: one string picks the back-end; each lives in its own module, imported only when asked for.

Example:
    >>> from tpru_agent.engines import ENGINES
    >>> sorted(ENGINES)
    ['classic', 'hf', 'onnx', 'openai']
"""

from __future__ import annotations

import importlib
from typing import Any

from tpru_agent.engines.base import Engine, GenerationOptions, Request
from tpru_agent.errors import ConfigError, close_matches

#: Engine kind -> ``"module:Class"``; the module is imported on first use (torch only loads with ``hf``/``onnx``).
ENGINES: dict[str, str] = {
    "hf": "tpru_agent.engines.hf:HFEngine",
    "onnx": "tpru_agent.engines.onnx:ONNXEngine",
    "openai": "tpru_agent.engines.openai:OpenAIEngine",
    "classic": "tpru_agent.engines.classic:ClassicEngine",
}


def engine_class(kind: str) -> type:
    """The class behind an engine kind (imports its module).

    Raises:
        ConfigError: unknown kind (with the closest known one).
    """
    key = str(kind).strip().lower()
    if key not in ENGINES:
        raise ConfigError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINES)}." + close_matches(key, ENGINES))
    module, _, name = ENGINES[key].partition(":")
    return getattr(importlib.import_module(module), name)


def create_engine(kind: str, model: Any, **kwargs: Any) -> Engine:
    """Build the engine ``kind`` for ``model`` (a name, folder, URL... as that engine understands it).

    Example:
        >>> engine = create_engine("hf", "tpru-3b", quantization="4bit")   # doctest: +SKIP
    """
    return engine_class(kind)(model, **kwargs)


__all__ = ["ENGINES", "Engine", "GenerationOptions", "Request", "create_engine", "engine_class"]
