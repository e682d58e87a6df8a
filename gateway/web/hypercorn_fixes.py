"""Five narrow fixes to Hypercorn 0.18.0 (pinned exactly), installed once at daemon start.

1. pgjones/hypercorn#225: an exception in one connection's task (e.g. ``h11.LocalProtocolError``
   after trailing bytes on an upgrade request) escapes into the server nursery and stops
   ``serve()`` — every session's clients would go with it. The guard confines any such error to
   its own connection: it is logged and that connection is dropped. ``trio.Cancelled`` is a
   ``BaseException`` and still propagates, so shutdown works as before.
2. Hypercorn tells the ASGI app only 1000 or 1006 when a client closes a WebSocket, dropping the
   code and reason the client sent. The relay must carry them to the child, so the WebSocket
   stream records the peer's close frame and reports its code and reason in
   ``websocket.disconnect``.
3. A closed WebSocket's ping task sleeps out its interval before noticing, holding the
   connection's task (and graceful shutdown) for up to ``CXG_WS_PING_INTERVAL``; here it wakes
   as soon as the stream closes.
4. After a WebSocket's closing handshake on HTTP/1.1, Hypercorn keeps the TCP connection open
   until the client drops it. RFC 6455 §7.1.1 has the server close TCP first; clients such as
   trio-websocket wait for that, and a lingering connection also holds up graceful shutdown.
5. Bytes that arrive after an upgrade request but before the app accepted it (e.g. a stray byte
   in the same TCP write) get a 400, but Hypercorn then never tells the already running app and
   never closes the TCP connection: the app's relay to the child waited forever, one leaked
   client per such request. The app now gets ``websocket.disconnect`` and the connection closes.
   Likewise a ``Sec-WebSocket-Key`` that is not 16 base64-encoded bytes (RFC 6455 §4.2.1) was
   accepted; it now gets 400 before the app runs.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Iterator
from typing import Any

import h11
import hypercorn.protocol.h2
import hypercorn.protocol.h11
import structlog
import trio
from hypercorn.events import Closed
from hypercorn.protocol.events import Body, Data, Request, StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import TCPServer
from wsproto.events import CloseConnection, Ping

log = structlog.get_logger(__name__)
_installed = False


class _CloseAwareWSStream(WSStream):
    """A WSStream that reports the client's own close code and reason to the app."""

    _peer_close: tuple[int, str] | None = None
    _tapped = False
    _closed_event: trio.Event | None = None

    def _closed_signal(self) -> trio.Event:
        if self._closed_event is None:
            self._closed_event = trio.Event()
        return self._closed_event

    async def _send_pings(self) -> None:
        closed = self._closed_signal()
        while not self.closed:
            await self._send_wsproto_event(Ping())
            with trio.move_on_after(self.config.websocket_ping_interval or 0):
                await closed.wait()

    async def handle(self, event: Any) -> None:
        try:
            await self._handle(event)
        finally:
            if self.closed:
                self._closed_signal().set()

    async def app_send(self, message: Any) -> None:
        try:
            await super().app_send(message)
        finally:
            if self.closed or self.state.name in ("CLOSED", "HTTPCLOSED"):
                self._closed_signal().set()

    async def _handle(self, event: Any) -> None:
        if isinstance(event, Request) and not _valid_websocket_key(event):
            # Without its key the handshake is invalid: Hypercorn's own 400 path, app not run.
            headers = [(k, v) for k, v in event.headers if k.lower() != b"sec-websocket-key"]
            await super().handle(dataclasses.replace(event, headers=headers))
            await self.send(StreamClosed(stream_id=self.stream_id))
            return
        if isinstance(event, (Body, Data)) and not self.closed and not self.handshake.accepted:
            # Hypercorn answers 400 and marks the stream closed, but never tells the app.
            await super().handle(event)
            if self.app_put is not None:
                await self.app_put({"type": "websocket.disconnect", "code": 1006})
            await self.send(StreamClosed(stream_id=self.stream_id))
            return
        connection = getattr(self, "connection", None)
        if connection is not None and not self._tapped:
            self._tap(connection)
        if (
            isinstance(event, StreamClosed)
            and not self.closed
            and self._peer_close is not None
            and getattr(self, "app_put", None) is not None
        ):
            self.closed = True
            code, reason = self._peer_close
            message = {"type": "websocket.disconnect", "code": code, "reason": reason}
            await self.app_put(message)  # type: ignore[misc]
            return
        await super().handle(event)

    def _tap(self, connection: Any) -> None:
        self._tapped = True
        original = connection.events

        def events() -> Iterator[Any]:
            for event in original():
                if isinstance(event, CloseConnection) and self._peer_close is None:
                    self._peer_close = (int(event.code), event.reason or "")
                yield event

        connection.events = events


def _valid_websocket_key(request: Request) -> bool:
    """Whether an HTTP/1.1 upgrade's key is 16 base64-encoded bytes (HTTP/2 has no key)."""
    if request.http_version != "1.1":
        return True
    keys = [value for name, value in request.headers if name.lower() == b"sec-websocket-key"]
    if len(keys) != 1:
        return False
    try:
        return len(base64.b64decode(keys[0].strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _guard_connection_errors() -> None:
    original_run = TCPServer.run

    async def guarded_run(self: TCPServer) -> None:
        try:
            await original_run(self)
        except Exception as exc:
            log.warning("http.connection_error", error=type(exc).__name__, detail=str(exc)[:200])
        except BaseExceptionGroup as group:
            # Cancelled must propagate; anything else from this one connection must not.
            rest = group.subgroup(lambda e: not isinstance(e, Exception))
            log.warning("http.connection_error", error="ExceptionGroup", detail=str(group)[:200])
            if rest is not None:
                raise rest from None

    TCPServer.run = guarded_run  # type: ignore[method-assign]


def _close_tcp_after_websocket() -> None:
    original = H11Protocol._maybe_recycle

    async def maybe_recycle(self: H11Protocol) -> None:
        await original(self)
        if self.connection.our_state is h11.SWITCHED_PROTOCOL:
            await self.send(Closed())

    H11Protocol._maybe_recycle = maybe_recycle  # type: ignore[method-assign]


def install_hypercorn_fixes() -> None:
    """Install the fixes (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    _guard_connection_errors()
    _close_tcp_after_websocket()
    hypercorn.protocol.h11.WSStream = _CloseAwareWSStream  # type: ignore[attr-defined]
    hypercorn.protocol.h2.WSStream = _CloseAwareWSStream  # type: ignore[attr-defined]
