"""Typed errors. Each keeps the evidence and says the fix; each also subclasses the fitting built-in."""

from __future__ import annotations

import importlib


class TPRUError(Exception):
    """Base class of every error this package raises on purpose."""


class FrameError(TPRUError, ValueError):
    """A frame (or the set of frames) cannot be used: missing, unreadable, wrong shape, too few or too many.

    Attributes:
        index: position of the offending frame in the caller's input, when one frame is at fault.
        source: the path or a short description of the offending input.
    """

    def __init__(self, message: str, *, index: int | None = None, source: str | None = None):
        self.index = index
        self.source = source
        if index is not None:
            where = f"frame {index}" + (f" ({source!r})" if source else "")
            message = f"{where}: {message}"
        elif source:
            message = f"{source!r}: {message}"
        super().__init__(message)


class ParseError(TPRUError, ValueError):
    """Model output that does not parse into a valid answer. ``raw`` keeps the full text."""

    def __init__(self, message: str, *, raw: str):
        self.raw = raw
        shown = raw if len(raw) <= 200 else raw[:100] + " ... " + raw[-80:]
        super().__init__(f"{message}; raw output: {shown!r}")


class ModelNotFoundError(TPRUError, FileNotFoundError):
    """Weights could not be found locally or fetched (offline, wrong name, missing files)."""


class EngineUnavailableError(TPRUError, ImportError):
    """An engine's optional dependencies are missing, or its runtime cannot start here."""


class EngineClosedError(TPRUError, RuntimeError):
    """An engine (or a ``TPRU`` whose engine) was closed and then asked a question; create a new one."""


class ConfigError(TPRUError, ValueError):
    """A configuration value or file is wrong; the message names the key and the accepted values."""


def install_hint(extra: str) -> str:
    """How to install an extra: the package name, and the command from a clone (it is not on PyPI yet)."""
    return f"pip install 'tpru-agent[{extra}]' (from a clone of the repository: pip install -e '.[{extra}]')"


def require(module: str, extra: str, *, what: str | None = None):
    """Import ``module`` or raise :class:`EngineUnavailableError` naming the extra that provides it.

    Example:
        >>> np = require("numpy", "hf")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        need = what or module
        raise EngineUnavailableError(
            f"{need} needs the '{module}' package, which is not installed ({exc}). "
            f"Install it with: {install_hint(extra)}"
        ) from exc


def close_matches(word: str, choices) -> str:
    """A ' Did you mean ...?' suffix for error messages (empty when nothing is close)."""
    import difflib

    hits = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {hits[0]!r}?" if hits else ""
