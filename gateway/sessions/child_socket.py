"""The relay's WebSocket to its session's child, driven directly by the relay's own tasks.

A general-purpose client (trio-websocket) runs a reader task per connection and hands each
message over through a memory channel: two extra scheduler passes and a lock per message on
the relay's hot path. Here the task that wants the next message reads the socket and runs
wsproto itself; messages come out in order, pings are answered in passing, and the close
handshake is carried out when the connection is closed. Only the relay uses it, with exactly
one task receiving and one task sending at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

# Read the child 64 KiB at a time, as Hypercorn reads the client: a 1 MiB frame is 16 reads.
RECEIVE_BUFFER = 64 * 1024
CLOSE_TIMEOUT = 2.0


class ChildClosed(Exception):
    """The child's connection is closed; ``code`` and ``reason`` are what the child sent."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"child connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class ChildRejected(ConnectionError):
    """The child refused the WebSocket upgrade (``status`` is its HTTP status)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the child refused the upgrade with HTTP {status}")
        self.status = status


class ChildSocket:
    """One open WebSocket to the child."""

    def __init__(
        self,
        stream: trio.SocketStream,
        connection: WSConnection,
        *,
        max_message_size: int,
        early: Sequence[Event] = (),
    ) -> None:
        self._stream = stream
        self._ws = connection
        self._max = max_message_size
        self._send_lock = trio.StrictFIFOLock()
        self._pending: deque[str | bytes] = deque()
        self._parts: list[str | bytes] = []
        self._size = 0
        self._closed: ChildClosed | None = None
        self._early = list(early)

    async def send_message(self, payload: str | bytes) -> None:
        """Send one message; text stays text, binary stays binary."""
        if self._closed is not None:
            raise self._closed
        await self._send(
            TextMessage(data=payload) if isinstance(payload, str) else BytesMessage(data=payload)
        )

    async def receive_message(self) -> str | bytes:
        """The next whole message; raises ``ChildClosed`` once the child has closed."""
        while not self._pending:
            if self._closed is not None:
                raise self._closed
            if self._early:
                events, self._early = self._early, []
            else:
                data = await self._stream.receive_some(RECEIVE_BUFFER)
                if not data:
                    self._closed = ChildClosed(1006, "connection lost")
                    continue
                self._ws.receive_data(data)
                events = list(self._ws.events())
            for event in events:
                await self._handle(event)
        return self._pending.popleft()

    async def _handle(self, event: Event) -> None:
        if isinstance(event, TextMessage | BytesMessage):
            self._size += len(event.data)
            if self._size > self._max:
                await self.close(1009, "message too big")
                self._closed = ChildClosed(1009, "message too big")
                return
            data = event.data
            self._parts.append(bytes(data) if isinstance(data, bytearray) else data)
            if event.message_finished:
                parts, self._parts, self._size = self._parts, [], 0
                if len(parts) == 1:
                    self._pending.append(parts[0])
                elif isinstance(event, TextMessage):
                    self._pending.append("".join(p for p in parts if isinstance(p, str)))
                else:
                    self._pending.append(b"".join(p for p in parts if isinstance(p, bytes)))
        elif isinstance(event, Ping):
            await self._send(event.response())
        elif isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                await self._send(event.response())
            self._closed = ChildClosed(int(event.code), event.reason or "")

    async def _send(self, event: Event) -> None:
        data = self._ws.send(event)
        async with self._send_lock:
            await self._stream.send_all(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (the answer is read by ``aclose``)."""
        if self._ws.state is ConnectionState.OPEN:
            try:
                await self._send(CloseConnection(code=code, reason=reason))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._closed = ChildClosed(1006, "connection lost")

    async def aclose(self) -> None:
        """Finish the closing handshake (bounded) and close the TCP connection."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self.close(1000, "")
                while self._ws.state is ConnectionState.LOCAL_CLOSING:
                    data = await self._stream.receive_some(RECEIVE_BUFFER)
                    if not data:
                        break
                    self._ws.receive_data(data)
                    for event in self._ws.events():
                        if isinstance(event, CloseConnection):
                            break
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await trio.aclose_forcefully(self._stream)


@asynccontextmanager
async def open_child_socket(
    url: str,
    headers: Sequence[tuple[str, str]],
    *,
    max_message_size: int,
    connect_timeout: float,
) -> AsyncIterator[ChildSocket]:
    """Connect to ``ws://IP:PORT/…`` with ``headers``; close it (handshake, TCP) on exit."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    with trio.fail_after(connect_timeout):
        stream = await trio.open_tcp_stream(host, port)
        try:
            socket, early = await _handshake(stream, f"{host}:{port}", target, headers)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    child = ChildSocket(stream, socket, max_message_size=max_message_size, early=early)
    try:
        yield child
    finally:
        await child.aclose()


async def _handshake(
    stream: trio.SocketStream, host: str, target: str, headers: Sequence[tuple[str, str]]
) -> tuple[WSConnection, list[Event]]:
    connection = WSConnection(ConnectionType.CLIENT)
    request = Request(
        host=host, target=target, extra_headers=[(k.encode(), v.encode()) for k, v in headers]
    )
    await stream.send_all(connection.send(request))
    while True:
        data = await stream.receive_some(RECEIVE_BUFFER)
        if not data:
            raise ConnectionError("the child closed the connection during the upgrade")
        connection.receive_data(data)
        events = list(connection.events())
        for index, event in enumerate(events):
            if isinstance(event, AcceptConnection):
                # Frames the child sent right behind its 101 belong to the relay.
                return connection, events[index + 1 :]
            if isinstance(event, RejectConnection):
                raise ChildRejected(event.status_code)
            if isinstance(event, RejectData):
                continue
