"""Durations ("1m30s" -> 90.0 seconds) and sizes ("8KiB" -> 8192 bytes) as written in configs."""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = ["UnitError", "parse_duration", "parse_size"]

DURATION_HINT = 'a number of seconds or a string such as "2s", "500ms" or "1m30s"'
SIZE_HINT = 'a number of bytes or a string such as "8KiB", "512k" or "1m"'

# Duration units, largest first: a compound duration must use them in this order, once each.
_DURATION_UNITS: dict[str, Fraction] = {
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

# Size units are binary (powers of 1024) whichever spelling is used: "8k", "8K", "8kb", "8KiB".
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)")


class UnitError(ValueError):
    """A duration or size could not be parsed.

    ``reason`` is a short explanation beyond "this is not a duration/size" (for example
    ``"negative"`` or ``'unknown unit "x"; use h, m, s or ms'``), or ``None`` when the value is
    simply not of the right shape.
    """

    reason: str | None

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message if reason is None else f"{message} ({reason})")
        self.reason = reason


def _duration_error(value: object, reason: str | None = None) -> UnitError:
    return UnitError(f"{value!r} is not a duration: expected {DURATION_HINT}", reason)


def _size_error(value: object, reason: str | None = None) -> UnitError:
    return UnitError(f"{value!r} is not a size: expected {SIZE_HINT}", reason)


def parse_duration(value: object) -> float:
    """Return a duration in seconds.

    Accepts a non-negative int or float (seconds), a numeric string (seconds), or a string of
    one or more ``<number><unit>`` parts with units ``h``, ``m``, ``s``, ``ms`` used largest
    first, at most once each: ``"10s"``, ``"500ms"``, ``"2m"``, ``"1h"``, ``"1m30s"``,
    ``"1.5s"``. Raises ``UnitError`` (a ``ValueError``) for anything else, including negative
    or non-finite values.
    """
    if isinstance(value, bool):
        raise _duration_error(value)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise _duration_error(value, "not finite")
        if value < 0:
            raise _duration_error(value, "negative")
        return float(value)
    if not isinstance(value, str):
        raise _duration_error(value)
    text = value.strip()
    if text.startswith("-"):
        raise _duration_error(value, "negative")
    if _NUMBER.fullmatch(text):
        return float(text)
    total = Fraction(0)
    pos = 0
    previous_rank = -1
    units = list(_DURATION_UNITS)
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise _duration_error(value)
        number, unit = match.groups()
        if unit not in _DURATION_UNITS:
            raise _duration_error(value, f'unknown unit "{unit}"; use h, m, s or ms')
        rank = units.index(unit)
        if rank <= previous_rank:
            raise _duration_error(value, "use each unit once, largest first, as in 1h30m")
        previous_rank = rank
        total += Fraction(number) * _DURATION_UNITS[unit]
        pos = match.end()
    if previous_rank < 0:
        raise _duration_error(value)
    return float(total)


def parse_size(value: object) -> int:
    """Return a size in bytes.

    Accepts a non-negative int (bytes), or a string ``<number><unit>`` where the unit is
    optional (bytes) or one of ``b``, ``k``/``kb``/``kib``, ``m``/``mb``/``mib``,
    ``g``/``gb``/``gib``, ``t``/``tb``/``tib`` in any letter case. All units are binary:
    ``"8k"``, ``"8K"``, ``"8kb"`` and ``"8KiB"`` all mean 8192. A fractional number is allowed
    when the result is a whole number of bytes (``"1.5k"`` is 1536). Raises ``UnitError`` (a
    ``ValueError``) for anything else, including negative values.
    """
    if isinstance(value, bool):
        raise _size_error(value)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise _size_error(value, "not a whole number of bytes")
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise _size_error(value, "negative")
        return value
    if not isinstance(value, str):
        raise _size_error(value)
    text = value.strip()
    if text.startswith("-"):
        raise _size_error(value, "negative")
    match = _SIZE.fullmatch(text)
    if match is None:
        raise _size_error(value)
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise _size_error(value, f'unknown unit "{unit}"; use k, m, g or t (or KiB, MiB, ...)')
    size = Fraction(number) * multiplier
    if size.denominator != 1:
        raise _size_error(value, "not a whole number of bytes")
    return int(size)
