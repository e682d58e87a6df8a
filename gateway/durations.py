"""Parsing of Go-style durations (``30m``, ``1h30m``, ``250ms``) and byte sizes (``64MiB``).

The Go service read its durations with ``time.ParseDuration``; operators' existing values must
keep working, so this accepts exactly that grammar. Pure functions, no I/O.
"""

from __future__ import annotations

import re

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# ASCII digits only (``\d`` would take any Unicode digit, which Go does not).
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
# Go durations are int64 nanoseconds; anything longer is "invalid duration" there too.
_MAX_SECONDS = (2**63 - 1) / 1e9

_SIZE = re.compile(r"([0-9]+)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000,
    "kib": 1 << 10,
    "mb": 1000**2,
    "mib": 1 << 20,
    "gb": 1000**3,
    "gib": 1 << 30,
    "tb": 1000**4,
    "tib": 1 << 40,
}


def parse_go_duration(text: str) -> float:
    """Return the number of seconds in a Go duration string.

    Accepts an optional sign, then one or more ``<number><unit>`` parts; ``0`` alone is allowed.
    Raises ``ValueError`` with a message suitable for an operator.
    """
    value = text.strip()
    if value in ("0", "+0", "-0"):
        return 0.0
    sign = 1.0
    if value[:1] in "+-" and value:
        sign = -1.0 if value[0] == "-" else 1.0
        value = value[1:]
    if not value:
        raise ValueError(f"invalid duration {text!r}")
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(value) or position == 0 or total > _MAX_SECONDS:
        raise ValueError(
            f"invalid duration {text!r} (expected a Go duration such as 30s, 5m, 1h30m)"
        )
    return sign * total


def parse_byte_size(text: str) -> int:
    """Return the number of bytes in ``64MiB``, ``16MB``, ``1048576`` and the like."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r} (expected bytes, or a number with KiB, MiB or GiB)"
        )
    unit = (match.group(2) or "B").lower()
    return int(match.group(1)) * _SIZE_FACTORS[unit]
