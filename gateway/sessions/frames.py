"""WebSocket frame headers (RFC 6455 §5.2), without I/O: what the tunnel needs to track frames.

The tunnel copies frames as bytes; it only needs to know where each frame starts and ends, its
opcode, whether it ends a message, and (client→child) its mask key. Frames the gateway sends
itself are built here too: close and ping frames to the client (unmasked, as a server sends
them) and close frames to the child (masked, as a client must send them).
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

try:
    # websockets' compiled unmasking (vectorised C); its pure-Python fallback builds several
    # payload-sized integers and byte strings per call.
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the wheel ships the extension
    from websockets.utils import apply_mask

CONTINUATION, TEXT, BINARY = 0x0, 0x1, 0x2
CLOSE, PING, PONG = 0x8, 0x9, 0xA
DATA_OPCODES = frozenset({CONTINUATION, TEXT, BINARY})
CONTROL_OPCODES = frozenset({CLOSE, PING, PONG})
# A control frame's payload is at most 125 bytes (RFC 6455 §5.5).
MAX_CONTROL_PAYLOAD = 125
# Two bytes, up to eight of extended length, four of mask.
MAX_HEADER = 14

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")

__all__ = ["FrameError", "Header", "apply_mask", "parse_header"]


class FrameError(Exception):
    """A frame that breaks RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, message: str, code: int = 1002) -> None:
        super().__init__(message)
        self.code = code


class Header(NamedTuple):
    """One frame's header: where its payload starts and how long it is."""

    fin: bool
    opcode: int
    length: int
    header_size: int
    mask: bytes | None


def parse_header(data: bytes | bytearray | memoryview, start: int = 0) -> Header | None:
    """The header at ``data[start:]``, or ``None`` if it is not complete yet.

    Raises ``FrameError`` for reserved bits (no extension is ever negotiated), unknown opcodes
    and control frames that are fragmented or too long.
    """
    available = len(data) - start
    if available < 2:
        return None
    first, second = data[start], data[start + 1]
    if first & 0x70:
        raise FrameError("reserved bits set (no extension was negotiated)")
    opcode = first & 0x0F
    fin = bool(first & 0x80)
    masked = bool(second & 0x80)
    length = second & 0x7F
    size = 2
    if length == 126:
        if available < 4:
            return None
        length = _U16.unpack_from(data, start + 2)[0]
        size = 4
    elif length == 127:
        if available < 10:
            return None
        length = _U64.unpack_from(data, start + 2)[0]
        if length >> 63:
            raise FrameError("frame length out of range")
        size = 10
    mask = None
    if masked:
        if available < size + 4:
            return None
        mask = bytes(data[start + size : start + size + 4])
        size += 4
    if opcode in CONTROL_OPCODES:
        if not fin or length > MAX_CONTROL_PAYLOAD:
            raise FrameError("fragmented or oversized control frame")
    elif opcode not in DATA_OPCODES:
        raise FrameError(f"unknown opcode {opcode:#x}")
    return Header(fin, opcode, length, size, mask)


def _frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    length = len(payload)
    if length < 126:
        head = bytes([0x80 | opcode, (0x80 if masked else 0) | length])
    elif length < 1 << 16:
        head = bytes([0x80 | opcode, (0x80 if masked else 0) | 126]) + _U16.pack(length)
    else:
        head = bytes([0x80 | opcode, (0x80 if masked else 0) | 127]) + _U64.pack(length)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + apply_mask(payload, key)


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: the code, then the reason cut to fit 125 bytes in UTF-8."""
    return _U16.pack(code) + reason.encode()[:123].decode("utf-8", "ignore").encode()


def server_close(code: int, reason: str) -> bytes:
    """A close frame the gateway sends to a client."""
    return _frame(CLOSE, close_payload(code, reason), masked=False)


def client_close(code: int, reason: str) -> bytes:
    """A close frame the gateway sends to the child (masked: it speaks as the client there)."""
    return _frame(CLOSE, close_payload(code, reason), masked=True)


def server_text(text: str) -> bytes:
    """A text message the gateway sends to a client (a policy's JSON-RPC error)."""
    return _frame(TEXT, text.encode(), masked=False)


def server_ping(payload: bytes) -> bytes:
    """A ping the gateway sends to a client."""
    return _frame(PING, payload, masked=False)


def parse_close(payload: bytes) -> tuple[int, str]:
    """Code and reason of a close frame's (unmasked) payload; 1005 when it has no code."""
    if len(payload) < 2:
        return 1005, ""
    return _U16.unpack_from(payload)[0], payload[2:].decode("utf-8", "replace")
