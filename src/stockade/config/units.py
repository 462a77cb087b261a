"""Parse and format the size ("2GiB") and duration ("1h30m") strings of the config file.

Sizes are binary, as in Docker: ``512M``, ``512MiB`` and ``512MB`` all mean 512 * 2**20 bytes.
Durations are a number of seconds or descending ``d``/``h``/``m``/``s``/``ms`` components.
Both raise ``ValueError`` (pydantic turns it into a validation error naming the key).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

__all__ = ["MAX_SIZE", "format_duration", "format_size", "parse_duration", "parse_size"]

#: Largest size accepted: anything bigger is a typo, and would overflow an int64 cgroup limit.
MAX_SIZE = 2**63 - 1

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "p": 2**50,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(?:i?b)?|b)?\s*", re.IGNORECASE)
_SIZE_FORMAT_UNITS = (
    ("PiB", 2**50),
    ("TiB", 2**40),
    ("GiB", 2**30),
    ("MiB", 2**20),
    ("KiB", 2**10),
)

_DURATION_UNITS: dict[str, Decimal] = {
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)\s*", re.IGNORECASE)
_DURATION_ORDER = ("d", "h", "m", "s", "ms")
_SIZE_HINT = "use a size such as '512MiB', '2GiB', '1.5G' or a number of bytes"
_DURATION_HINT = "use a duration such as '30s', '10m', '1h30m' or a number of seconds"


def parse_size(value: str | int) -> int:
    """Return the number of bytes ``value`` stands for; fractions of a byte are dropped."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a size, got {type(value).__name__}; {_SIZE_HINT}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.fullmatch(value)
        if match is None:
            raise ValueError(f"{value!r} is not a size; {_SIZE_HINT}")
        number, unit = match.group(1), (match.group(2) or "").lower()
        size = int(Decimal(number) * _SIZE_UNITS[unit])
    if size < 0:
        raise ValueError(f"a size cannot be negative; {_SIZE_HINT}")
    if size > MAX_SIZE:
        raise ValueError(f"size {value!r} is too large (at most {MAX_SIZE} bytes)")
    return size


def format_size(size: int) -> str:
    """Format ``size`` bytes exactly, with the largest binary unit that divides it."""
    if size < 0:
        raise ValueError("a size cannot be negative")
    for suffix, factor in _SIZE_FORMAT_UNITS:
        if size and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def parse_duration(value: str | int | float) -> float:
    """Return the number of seconds ``value`` stands for."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration, got {type(value).__name__}; {_DURATION_HINT}")
    seconds = float(_parse_duration_text(value)) if isinstance(value, str) else float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a finite, non-negative duration; {_DURATION_HINT}")
    return seconds


def _parse_duration_text(text: str) -> Decimal:
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"empty duration; {_DURATION_HINT}")
    # A bare number is a number of seconds, as in the TOML number form.
    if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
        return Decimal(stripped)
    return _parts(stripped)


def _parts(text: str) -> Decimal:
    total = Decimal(0)
    position = 0
    last_rank = -1
    while position < len(text):
        match = _DURATION_PART_RE.match(text, position)
        if match is None:
            raise ValueError(f"{text!r} is not a duration; {_DURATION_HINT}")
        unit = match.group(2).lower()
        rank = _DURATION_ORDER.index(unit)
        if rank <= last_rank:
            raise ValueError(
                f"{text!r} is not a duration: units must appear once each, largest first "
                f"(d, h, m, s, ms); {_DURATION_HINT}"
            )
        last_rank = rank
        total += Decimal(match.group(1)) * _DURATION_UNITS[unit]
        position = match.end()
    return total


def format_duration(seconds: float) -> str:
    """Format ``seconds`` so that ``parse_duration`` gives back exactly the same float."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("a duration must be finite and non-negative")
    if seconds != int(seconds) or seconds >= 2**53:
        # Plain decimal notation of the shortest repr: parses back to the very same float.
        return f"{Decimal(repr(seconds)):f}s"
    whole = int(seconds)
    if whole == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        factor = int(_DURATION_UNITS[unit])
        count, whole = divmod(whole, factor)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
