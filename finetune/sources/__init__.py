"""Episode sources: anything that yields ordered frames of one procedure with a description."""

from .base import Episode

__all__ = ["Episode"]
