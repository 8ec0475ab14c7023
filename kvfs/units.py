"""Human sizes (``32 MiB``, ``8GiB``, ``1.5G``) and durations (``7d``, ``12h``)."""

from __future__ import annotations

import math
import re

from .errors import InvalidInput

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "p": 1000**5,
    "pb": 1000**5,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
    "pi": 1024**5,
    "pib": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*([smhdw])")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(value: str | bool | int, what: str, error: type[Exception] = InvalidInput) -> bool:
    """``"true"``/``"yes"``/``"on"``/``"1"`` -> True, ``"false"``/``"no"``/``"off"``/``"0"`` -> False (any
    case; real booleans and 0/1 as they are); anything else raises ``error`` naming ``what``."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise error(f"{what}={value!r}: use true or false")


def parse_size(text: str | int, what: str | None = None, error: type[Exception] = InvalidInput) -> int:
    """``"8GiB"`` -> 8589934592. Decimal (``GB``) and binary (``GiB``) units; bare numbers are bytes.

    Anything else raises ``error``, its message starting with ``what`` (the option's name) when given."""
    at = f"{what}: " if what else ""
    if isinstance(text, bool):
        raise error(f"{at}not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise error(f"{at}a size cannot be negative: {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise error(f"{at}not a size: {text!r} (use a number with an optional unit, e.g. 512MiB, 8GiB, 2TB)")
    number, unit = m.group(1), _SIZE_UNITS[m.group(2).lower()]
    if number.isdigit():
        return int(number) * unit  # exact, however large (a float would round above 2**53, or overflow)
    try:
        return int(float(number) * unit)
    except OverflowError:
        raise error(f"{at}not a size: {text!r} (too large)") from None


def format_size(n: int | float) -> str:
    """8589934592 -> ``'8 GiB'``; small sizes in bytes."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    raise AssertionError("unreachable")


def parse_duration(text: str | float | int) -> float:
    """``"7d"`` -> 604800.0; ``"1h30m"`` works; a bare number is seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise InvalidInput(f"not a duration: {text!r} (give a finite number of seconds)")
        if text < 0:
            raise InvalidInput(f"a duration cannot be negative: {text}")
        return float(text)
    s = str(text).strip().lower()
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):  # "nan" and "inf" parse as floats; as an age they would match nothing
            raise InvalidInput(f"not a duration: {text!r} (use e.g. 90s, 30m, 12h, 7d, 2w or 1h30m)")
        if value < 0:
            raise InvalidInput(f"a duration cannot be negative: {text!r}")
        return value
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise InvalidInput(
            f"not a duration: {text!r} (use e.g. 90s, 30m, 12h, 7d, 2w or 1h30m)"
        )
    return total


def format_duration(seconds: float) -> str:
    """604800 -> ``'7d'``; 5400 -> ``'1h30m'``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    parts = []
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return "".join(parts)
