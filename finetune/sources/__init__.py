"""Episode sources: anything that yields ordered frames of one procedure with a description."""

from tpru_agent.finetune.sources.base import Episode

__all__ = ["Episode"]
