"""Validation of option values that arrive as strings from the command line (``--strict false``).

``bool("false")`` is ``True`` and ``float("nan")`` compares false with every bound, so options are
parsed here, once, with a clear error naming the option.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["as_bool", "as_probability", "as_seconds"]

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "")


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a boolean: a bool, 0/1, or one of true/false, yes/no, on/off, 1/0 (any case).

    Raises:
        ValueError: naming ``name`` for anything else (e.g. ``"flase"``, 2, None).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}.")


def as_probability(value: Any, name: str) -> float:
    """``value`` as a finite number in [0, 1] (a threshold on a probability); booleans are refused.

    Raises:
        ValueError: naming ``name`` for a boolean, a non-number, NaN/inf or a number outside [0, 1].
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number in [0, 1], got the boolean {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.") from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    return number


def as_seconds(value: Any, name: str) -> float | None:
    """``value`` as a positive, finite number of seconds, or None (no limit) for None, 0, ``"none"``,
    ``"null"`` or ``""``; booleans are refused.

    Raises:
        ValueError: naming ``name`` for a boolean, a non-number, NaN/inf or a negative number.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of seconds or null, got the boolean {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds or null, got {value!r}.") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a number of seconds or null, got {value!r}.")
    return number or None
