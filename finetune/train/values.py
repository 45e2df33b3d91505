"""Config values typed against a field's type hint: YAML and ``--set`` text become the field's type.

Used for :class:`tpru_agent.finetune.train.config.FinetuneConfig`'s own fields and for TRL ``GRPOConfig`` fields
passed through (typed against ``GRPOConfig``'s hints).

Example:
    >>> coerce_as("beta", "0.02", float | None), coerce_as("bf16", "null", bool | None)
    (0.02, None)
"""

from __future__ import annotations

import types
import typing
from typing import Any

from tpru_agent.errors import ConfigError


def hint_types(tp) -> tuple:
    """The concrete types a field accepts (``bool | None`` -> ``(bool, NoneType)``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(arg for a in typing.get_args(tp) for arg in hint_types(a))
    return (origin or tp,)


def coerce_as(key: str, value: Any, hint, *, item=str) -> Any:
    """``value`` (YAML / CLI text or a YAML scalar) as type ``hint`` (``"1e-6"`` -> 1e-06, ``"null"`` -> None);
    list items converted with ``item``.

    Raises:
        ConfigError: a value of none of the types ``hint`` allows, naming ``key``.
    """
    allowed = hint_types(hint)
    nullable = type(None) in allowed
    if value is None or (nullable and isinstance(value, str) and value.strip().lower() in {"none", "null", "~", ""}):
        if nullable:
            return None
        raise ConfigError(f"{key} cannot be empty (null)")
    for tp in allowed:
        if tp is type(None):
            continue
        try:
            if tp is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.strip().lower() in {"true", "yes", "1", "on", "false", "no", "0",
                                                                         "off"}:
                    return value.strip().lower() in {"true", "yes", "1", "on"}
                continue
            if tp is int and not isinstance(value, bool):
                if isinstance(value, float) and not value.is_integer():
                    continue
                return int(value)
            if tp is float and not isinstance(value, bool):
                return float(value)
            if tp is str:
                return str(value)
            if tp is list:
                items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
                return [item(v) for v in items]
            if tp is dict and isinstance(value, dict):
                return dict(value)
        except (TypeError, ValueError):
            continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r}")
