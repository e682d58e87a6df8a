"""Strict readers for tool arguments: every value a model sends is typed, bounded and explained.

Pure functions, no I/O. Each raises ``ValueError`` with a sentence naming the argument to fix;
the server sends it back as the tool's error result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

MAX_PATH_CHARS = 4096


def check_known(arguments: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse arguments the tool does not have (a misspelt one would otherwise be ignored)."""
    unknown = sorted(set(arguments) - set(known))
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}; this tool takes {sorted(known)}")


def text(
    arguments: Mapping[str, Any],
    name: str,
    *,
    max_bytes: int,
    required: bool = False,
    allow_empty: bool = True,
) -> str | None:
    """A string argument of at most ``max_bytes`` UTF-8 bytes, without NUL characters."""
    value = arguments.get(name)
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{name} must not contain NUL characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{name} must be valid Unicode text (it has a lone surrogate)") from None
    if size > max_bytes:
        raise ValueError(f"{name} is {size} bytes; at most {max_bytes} are accepted")
    return value


def integer(
    arguments: Mapping[str, Any], name: str, *, minimum: int, maximum: int, default: int
) -> int:
    """An integer argument within ``[minimum, maximum]`` (a whole float such as 5.0 counts)."""
    value = arguments.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{name} must be an integer")
        value = int(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def boolean(arguments: Mapping[str, Any], name: str, *, default: bool) -> bool:
    """A boolean argument."""
    value = arguments.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    return value


def path(arguments: Mapping[str, Any], name: str = "path") -> str:
    """A file path (resolved later against the executor, see ``tools.paths``).

    A ``file:///…`` URI is taken as the path it names; one with a host is refused.
    """
    value = text(arguments, name, max_bytes=MAX_PATH_CHARS, required=True, allow_empty=False)
    assert value is not None
    return plain_path(value, name)


def plain_path(value: str, name: str = "path") -> str:
    """``value`` checked, with a ``file:///`` URI turned into its path."""
    check_path(value, name)
    if value.startswith("file:"):
        parts = urlsplit(value)
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"{name} must be a path or a file:/// URI without a host")
        value = unquote(parts.path)
        check_path(value, name)
    return value


def check_path(value: str, name: str = "path") -> None:
    """Refuse what cannot be a path here: empty, NUL, line breaks, over-long."""
    if not value.strip():
        raise ValueError(f"{name} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{name} must not contain NUL characters")
    if "\n" in value or "\r" in value:
        raise ValueError(f"{name} must not contain line breaks")
    if len(value.encode("utf-8", errors="replace")) > MAX_PATH_CHARS:
        raise ValueError(f"{name} is longer than {MAX_PATH_CHARS} bytes")
