"""A fault-injecting TCP proxy on loopback, for tests of what the gateway does when a link fails.

Put it between the gateway and anything it reaches over TCP (S3, a peer pod's internal port)::

    proxy = await nursery.start(FaultProxy(("127.0.0.1", port)).serve)
    ...  # point the client at proxy.address
    proxy.cut()            # existing connections reset, new ones closed unanswered
    proxy.pass_through()   # back to normal on the same address

Faults, each applying to the connections that exist as well as to new ones:

* ``pass_through()`` — bytes go both ways untouched (the start state);
* ``refuse_new()`` — new connections are closed at once, before anything reaches the target;
  existing ones go on;
* ``cut()`` — ``refuse_new()`` and every existing connection is reset (RST to the client);
* ``delay(seconds)`` — every chunk, each way, is delivered ``seconds`` after it was read;
* ``black_hole()`` — connections stay open and accept bytes, which vanish: nothing reaches the
  other side, in either direction (new connections are accepted and never connected onward).
  A later ``pass_through()`` lets bytes sent from then on flow again.

Bounded: at most ``max_connections`` at once (more are closed at once and counted), at most
``max_buffered`` bytes held per direction of a connection by a delay (the reader waits: the
sender sees backpressure), and black-holed bytes are dropped, never kept. Counters
(``accepted``, ``refused``, ``cut_connections``, ``bytes_forwarded``) are for assertions.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct

import trio

CHUNK = 65536


class Mode(enum.Enum):
    """What the proxy does with the bytes of its connections."""

    PASS = "pass"
    REFUSE_NEW = "refuse-new"
    CUT = "cut"
    DELAY = "delay"
    BLACK_HOLE = "black-hole"


class FaultProxy:
    """See the module docstring."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        max_connections: int = 256,
        max_buffered: int = 1 << 20,
    ) -> None:
        self.target = target
        self.max_connections = max_connections
        self.max_buffered = max_buffered
        self.mode = Mode.PASS
        self.delay_seconds = 0.0
        self._port: int | None = None
        self._live: set[trio.CancelScope] = set()
        self._clients: set[trio.SocketStream] = set()
        # Woken on every change of mode, so a held or black-holed direction looks again.
        self._changed = trio.Event()
        self.accepted = 0
        self.refused = 0
        self.cut_connections = 0
        self.bytes_forwarded = 0

    # -- where it listens ----------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) clients connect to."""
        assert self._port is not None, "start serve() first"
        return ("127.0.0.1", self._port)

    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT``."""
        host, port = self.address
        return f"{host}:{port}"

    def url(self, scheme: str = "http") -> str:
        """``scheme://127.0.0.1:PORT``."""
        return f"{scheme}://{self.host_port}"

    @property
    def live_connections(self) -> int:
        """Connections open now."""
        return len(self._live)

    async def serve(self, *, task_status: trio.TaskStatus[FaultProxy]) -> None:
        """Listen on a loopback port until cancelled; ``started`` with the proxy itself."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self._port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    # -- faults ----------------------------------------------------------------------------------

    def pass_through(self) -> None:
        """Bytes flow untouched again."""
        self._set(Mode.PASS)

    def refuse_new(self) -> None:
        """Close new connections at once; existing ones go on."""
        self._set(Mode.REFUSE_NEW)

    def cut(self) -> None:
        """Reset every existing connection and close new ones at once."""
        self._set(Mode.CUT)
        for client in list(self._clients):
            _reset_on_close(client)
        for scope in list(self._live):
            scope.cancel()

    def delay(self, seconds: float) -> None:
        """Deliver every chunk ``seconds`` after it was read, both ways."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        self.delay_seconds = seconds
        self._set(Mode.DELAY)

    def black_hole(self) -> None:
        """Accept bytes and drop them; nothing reaches the other side."""
        self._set(Mode.BLACK_HOLE)

    def _set(self, mode: Mode) -> None:
        self.mode = mode
        self._changed.set()
        self._changed = trio.Event()

    # -- connections -----------------------------------------------------------------------------

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if self.mode in (Mode.REFUSE_NEW, Mode.CUT) or len(self._live) >= self.max_connections:
                self.refused += 1
                return
            self.accepted += 1
            with trio.CancelScope() as scope:
                self._live.add(scope)
                self._clients.add(client)
                try:
                    await self._relay(client)
                finally:
                    self._live.discard(scope)
                    self._clients.discard(client)
            if scope.cancelled_caught:
                self.cut_connections += 1

    async def _relay(self, client: trio.SocketStream) -> None:
        # A connection born in a black hole is connected onward only once the hole closes.
        while self.mode is Mode.BLACK_HOLE:
            client_ended = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._swallow, client, client_ended, nursery.cancel_scope)
                await self._changed.wait()
                nursery.cancel_scope.cancel()
            if client_ended.is_set():
                return
        upstream = await trio.open_tcp_stream(*self.target)
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)

    async def _swallow(
        self, source: trio.SocketStream, ended: trio.Event, done: trio.CancelScope
    ) -> None:
        try:
            while await source.receive_some(CHUNK):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        ended.set()
        done.cancel()

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, failed: trio.CancelScope
    ) -> None:
        """One direction, to its end (then EOF onward); a broken side ends the connection."""
        capacity = max(1, self.max_buffered // CHUNK)
        send, receive = trio.open_memory_channel[tuple[float, bytes]](capacity)

        # A broken side is caught where it breaks, inside the nursery: escaping it, it would
        # come out as an ExceptionGroup that no plain ``except`` catches.
        async def deliver() -> None:
            try:
                async with receive:
                    async for at, data in receive:
                        await trio.sleep_until(at)
                        await sink.send_all(data)
                        self.bytes_forwarded += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                failed.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            try:
                async with send:
                    while data := await source.receive_some(CHUNK):
                        if self.mode is Mode.BLACK_HOLE:
                            continue  # dropped, never kept
                        delay = self.delay_seconds if self.mode is Mode.DELAY else 0.0
                        # A full channel holds the reader back: backpressure to the sender.
                        await send.send((trio.current_time() + delay, data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                failed.cancel()
                return
        try:
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            failed.cancel()


def _reset_on_close(stream: trio.SocketStream) -> None:
    """Make closing ``stream`` send RST (SO_LINGER 0), as a cut link does, not a polite FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
