"""Which ONNX Runtime is installed, and whether it can give what was asked (the onnxruntime / -gpu clash).

``onnxruntime`` (CPU, a base dependency of tpru-agent) and ``onnxruntime-gpu`` (the ``[onnx-gpu]`` extra) install
into the same ``onnxruntime/`` package folder: the last one installed wins, and uninstalling either deletes files
the other needs. A GPU user must end with ``onnxruntime-gpu`` alone; :data:`GPU_FIX` gets there from any state.
:func:`runtime_problem` is a pure function over the installed distributions and the providers, so it is tested
with tables rather than by installing packages.
"""

from __future__ import annotations

import importlib.metadata
from typing import Mapping, Sequence

#: Distributions that install the ``onnxruntime`` module (the CPU build first).
DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
CUDA = "CUDAExecutionProvider"
#: From any mix of the two to a working CUDA provider (pip then reports tpru-agent's onnxruntime requirement as
#: unmet: harmless, onnxruntime-gpu provides the same module).
GPU_FIX = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
#: Back to the CPU build alone.
CPU_FIX = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime"


def installed_distributions() -> dict[str, str | None]:
    """Version of each of :data:`DISTRIBUTIONS` installed here (``None``: not installed)."""
    found: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def runtime_problem(installed: Mapping[str, str | None], providers: Sequence[str], wants_cuda: bool) -> str | None:
    """What is wrong with this ONNX Runtime install for the device asked for, with the fix; ``None`` when fine.

    Args:
        installed: distribution -> version or ``None`` (:func:`installed_distributions`).
        providers: ``onnxruntime.get_available_providers()``.
        wants_cuda: CUDA was asked for explicitly (``device="cuda"`` / ``"cuda:N"``).

    Example:
        >>> runtime_problem({"onnxruntime": "1.22.0", "onnxruntime-gpu": None}, ["CPUExecutionProvider"], False)
        >>> "pip install onnxruntime-gpu" in runtime_problem(
        ...     {"onnxruntime": "1.22.0", "onnxruntime-gpu": None}, ["CPUExecutionProvider"], True)
        True
    """
    have = [d for d in DISTRIBUTIONS if installed.get(d)]
    cuda = CUDA in providers
    if len(have) > 1:
        state = ("the CUDA provider works for now, but installing or uninstalling either one breaks it" if cuda else
                 "the CPU build was installed last and won, so there is no CUDA provider")
        return (f"both onnxruntime ({installed['onnxruntime']}) and onnxruntime-gpu ({installed['onnxruntime-gpu']}) "
                f"are installed; they share one package folder and {state}. Fix for a GPU: `{GPU_FIX}`; for the "
                f"CPU only: `{CPU_FIX}`")
    if wants_cuda and not cuda:
        which = have[0] if have else "no onnxruntime distribution"
        return (f"CUDA was asked for but this onnxruntime ({which}) has no CUDA provider (available: "
                f"{', '.join(providers) or 'none'}). Fix: `{GPU_FIX}` (tpru-agent installs the CPU build by "
                "default; the two share one package folder, so remove both first)")
    return None


def runtime_facts() -> dict:
    """For ``tpru env``: the distributions installed, the providers the module offers, and any problem with its fix."""
    import importlib.util

    installed = installed_distributions()
    providers: list[str] = []
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            import onnxruntime

            providers = list(onnxruntime.get_available_providers())
        except Exception as exc:  # a half-uninstalled runtime (the clash) fails on import: show it, do not crash
            providers = [f"(import failed: {type(exc).__name__}: {exc})"]
    return {"distributions": installed, "providers": providers,
            "problem": runtime_problem(installed, providers, wants_cuda=False)}


__all__ = ["CPU_FIX", "DISTRIBUTIONS", "GPU_FIX", "installed_distributions", "runtime_facts", "runtime_problem"]
