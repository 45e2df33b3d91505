"""tpru-agent: temporal and procedural understanding for robot and GUI agents.

Example:
    >>> from tpru_agent import TPRU
    >>> model = TPRU("tpru-3b")                                     # doctest: +SKIP
    >>> model.order_frames(["f3.png", "f1.png", "f2.png", "f4.png"]).order   # doctest: +SKIP
    (1, 2, 0, 3)
"""

from tpru_agent.errors import (
    ConfigError,
    EngineClosedError,
    EngineUnavailableError,
    FrameError,
    ModelNotFoundError,
    ParseError,
    TPRUError,
)
from tpru_agent.results import CheckEvent, ChoiceResult, OrderResult, ProgressResult, Status, StepVerdict

__version__ = "0.1.0"


def __dir__():  # pragma: no cover - cosmetic
    return sorted(__all__)


# The facade and the checker are imported eagerly: neither imports torch at import time.
from tpru_agent.checker import ProcedureChecker  # noqa: E402
from tpru_agent.model import TPRU  # noqa: E402

__all__ = [
    "TPRU", "ProcedureChecker", "OrderResult", "ChoiceResult", "StepVerdict", "ProgressResult", "CheckEvent", "Status",
    "TPRUError", "FrameError", "ParseError", "ModelNotFoundError", "EngineUnavailableError", "EngineClosedError",
    "ConfigError",
    "__version__",
]
