"""Bounded output: the first and the last bytes of a stream, and how many were left out.

A command's start (what it is doing) and its end (how it failed) are what a reader needs; the
middle of a long output is dropped as it arrives, so memory stays bounded by the limit however
much a command prints.
"""

from __future__ import annotations

import attrs

from gateway.envmcp.registry import TextOutcome


@attrs.define
class HeadTail:
    """Keeps ``limit`` bytes at most: half from the start, half from the end."""

    limit: int
    head: bytearray = attrs.field(factory=bytearray)
    tail: bytearray = attrs.field(factory=bytearray)
    dropped: int = 0
    total: int = 0

    def add(self, chunk: bytes) -> None:
        """Append ``chunk``; what no longer fits is counted, not kept."""
        self.total += len(chunk)
        head_room = self.limit // 2 - len(self.head)
        if head_room > 0:
            self.head += chunk[:head_room]
            chunk = chunk[head_room:]
        if not chunk:
            return
        self.tail += chunk
        tail_limit = self.limit - self.limit // 2
        excess = len(self.tail) - tail_limit
        if excess > 0:
            del self.tail[:excess]
            self.dropped += excess

    def text(self) -> str:
        """The kept bytes as text (a character cut by the bound becomes U+FFFD)."""
        head = self.head.decode("utf-8", errors="replace")
        if not self.dropped:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", errors="replace")
        tail = self.tail.decode("utf-8", errors="replace")
        return f"{head}\n[… {self.dropped} bytes of output left out …]\n{tail}"


def tool_result(text: str, *, error: bool = False) -> TextOutcome:
    """A tool's answer: its text, an error when ``error``."""
    return TextOutcome(text=text, is_error=error)
