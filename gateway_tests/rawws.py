"""A WebSocket client written by hand, for tests and benchmarks that need exact control.

It sends exactly the frames it is told to (masked, as a client must), reads whole frames back
and never answers anything by itself — a hostile or dead peer is just a client that stops
calling it. Many hundreds of them cost little, unlike full client libraries.
"""

from __future__ import annotations

import base64
import os
import struct

import trio

from gateway.sessions import frames


def upgrade_request(host: str, port: int, token: str, key: str, extra: str = "") -> bytes:
    """A WebSocket upgrade for ``/`` with a bearer token (``extra``: more header lines)."""
    return (
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
        f"Authorization: Bearer {token}\r\n{extra}\r\n"
    ).encode()


async def read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """A response head and whatever arrived after it."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(f"closed after {received!r}")
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    return head, rest


class RawClient:
    """Masked frames out, whole frames in."""

    def __init__(self, stream: trio.SocketStream, rest: bytes) -> None:
        self.stream = stream
        self.buffer = rest

    @staticmethod
    def frame(opcode: int, payload: bytes) -> bytes:
        """One whole masked frame, as bytes (several can go out in one write)."""
        key = os.urandom(4)
        length = len(payload)
        if length < 126:
            head = bytes([0x80 | opcode, 0x80 | length])
        elif length < 1 << 16:
            head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", length)
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", length)
        return head + key + frames.apply_mask(payload, key)

    async def send(self, opcode: int, payload: bytes) -> None:
        """One masked frame."""
        await self.stream.send_all(self.frame(opcode, payload))

    async def send_fragments(self, opcode: int, parts: list[bytes]) -> None:
        """One message in several masked frames (each under 126 bytes)."""
        data = b""
        for index, part in enumerate(parts):
            key = os.urandom(4)
            first = (opcode if index == 0 else frames.CONTINUATION) | (
                0x80 if index == len(parts) - 1 else 0
            )
            data += bytes([first, 0x80 | len(part)]) + key + frames.apply_mask(part, key)
        await self.stream.send_all(data)

    async def _need(self, size: int) -> None:
        while len(self.buffer) < size:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                raise EOFError
            self.buffer += chunk

    async def receive(self) -> tuple[int, bytes]:
        """The next frame from the server (opcode, payload); pings are skipped."""
        while True:
            await self._need(2)
            opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            start = 2
            if length == 126:
                await self._need(4)
                length, start = struct.unpack_from("!H", self.buffer, 2)[0], 4
            elif length == 127:
                await self._need(10)
                length, start = struct.unpack_from("!Q", self.buffer, 2)[0], 10
            await self._need(start + length)
            payload = bytes(self.buffer[start : start + length])
            self.buffer = self.buffer[start + length :]
            if opcode != frames.PING:
                return opcode, payload


async def raw_connect(host: str, port: int, token: str) -> tuple[bytes, RawClient]:
    """Open a connection, send the upgrade; the response head and the client."""
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(
        upgrade_request(host, port, token, base64.b64encode(os.urandom(16)).decode())
    )
    head, rest = await read_head(stream)
    return head, RawClient(stream, rest)
