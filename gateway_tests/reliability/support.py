"""Helpers of the reliability suite: scale, counts, waiting, and a cuttable TCP proxy."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio
from hypothesis import HealthCheck, settings
from trio_websocket import ConnectionClosed, WebSocketConnection

from gateway_tests.harness import POLL_INTERVAL

#: ``CXG_SOAK=1``: the long runs (``make soak``); otherwise the short ones of ``make test``.
SOAK = os.environ.get("CXG_SOAK") == "1"

#: Counts of every scenario of this run, by test id, in the order they were recorded.
recorded_counts: dict[str, dict[str, Any]] = {}


def bounded(
    examples: int,
    *,
    suppress: Sequence[HealthCheck] = (HealthCheck.too_slow, HealthCheck.function_scoped_fixture),
) -> Callable[[Any], Any]:
    """Hypothesis settings of this suite: bounded examples, no deadline, no example database.

    ``suppress`` names the health checks that do not apply (slow examples are the point here;
    the fixtures a property takes hold nothing an example changes).
    """
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(suppress),
    )


class Scale:
    """Which length of a scenario runs: the short one (``make test``) or the soak one."""

    def __init__(self, soak: bool) -> None:
        self.soak = soak

    def pick(self, short: int, soak: int) -> int:
        """``short`` for the short run, ``soak`` for the soak run."""
        return soak if self.soak else short

    def __repr__(self) -> str:
        return "soak" if self.soak else "short"


class CountsRecorder:
    """Collects one scenario's counts for the end-of-run summary."""

    def __init__(self, nodeid: str) -> None:
        self.values: dict[str, Any] = recorded_counts.setdefault(nodeid, {})

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value

    def add(self, key: str, amount: int = 1) -> None:
        """Add ``amount`` to the count ``key``."""
        self.values[key] = self.values.get(key, 0) + amount


def write_counts(terminalreporter: Any, title: str, counts: dict[str, dict[str, Any]]) -> None:
    """Print ``counts`` (by test id) as a section ``title`` of pytest's terminal summary."""
    if not counts:
        return
    write: Callable[..., None] = terminalreporter.write_line
    terminalreporter.section(title)
    for nodeid, values in counts.items():
        write(f"{nodeid}: " + ", ".join(f"{key}={value}" for key, value in values.items()))


async def until(predicate: Callable[[], Awaitable[bool]], *, within: float = 10.0) -> None:
    """Wait until an async ``predicate()`` holds, for states only visible by asking.

    The admin listing and the object store notify nobody when they change, so they are asked
    again every ``POLL_INTERVAL``, bounded by ``within`` seconds.
    """
    with trio.fail_after(within):
        while not await predicate():  # noqa: ASYNC110 - no event source for these states
            await trio.sleep(POLL_INTERVAL)


async def close_code(ws: WebSocketConnection) -> int:
    """Read until the connection closes; return the close code it got."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as closed:
        assert closed.reason is not None
        return int(closed.reason.code)


class CuttableProxy:
    """A TCP proxy on loopback in front of ``upstream``, with an outage switch.

    ``cut()`` ends every open connection at once (reset) and refuses new ones until
    ``restore()``: the upstream looks down to whoever uses the proxy. With ``lose_answers``
    set, requests still reach the upstream but its answers are dropped and the connection
    reset: the caller cannot tell whether its request took effect. The proxy counts what it
    saw; ``wait_until`` wakes on every count change.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.down = False
        self.lose_answers = False
        # With lose_answers: lose only this many answers, then pass them again (None: all).
        self.answers_to_lose: int | None = None
        self.answers_lost = 0
        self.accepted = 0
        self.refused = 0
        self.bytes_up = 0
        self._streams: set[trio.SocketStream] = set()
        self._scopes: set[trio.CancelScope] = set()
        self._changed = trio.Event()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Take the upstream down: drop open connections, refuse new ones."""
        self.down = True
        for scope in list(self._scopes):
            scope.cancel()
        for stream in list(self._streams):
            _reset(stream)

    def restore(self) -> None:
        """Bring the upstream back."""
        self.down = False

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds; re-checked on every count change."""
        while not condition():
            await self._changed.wait()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (ephemeral port) until cancelled; report the proxy's URL."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.url)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.down:
            self.refused += 1
            self._bump()
            _reset(client)
            return
        self.accepted += 1
        self._bump()
        try:
            upstream = await trio.open_tcp_stream(*self.upstream)
        except OSError:
            _reset(client)
            return
        scope = trio.CancelScope()
        self._scopes.add(scope)
        self._streams |= {client, upstream}
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, upstream, True, nursery.cancel_scope)
                    nursery.start_soon(self._pipe, upstream, client, False, nursery.cancel_scope)
        finally:
            self._scopes.discard(scope)
            self._streams -= {client, upstream}
            for stream in (client, upstream):
                _reset(stream)

    async def _pipe(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        upwards: bool,
        done: trio.CancelScope,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if not upwards and self.lose_answers:
                    # An interim "100 Continue" still passes, so the request body is sent in
                    # full; the final answer is what gets lost.
                    interim, data = _split_interim(data)
                    if interim:
                        await sink.send_all(interim)
                    if data:
                        self.answers_lost += 1
                        if self.answers_to_lose is not None:
                            self.answers_to_lose -= 1
                            self.lose_answers = self.answers_to_lose > 0
                        self._bump()
                        break
                    continue
                await sink.send_all(data)
                if upwards:
                    self.bytes_up += len(data)
                    self._bump()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        done.cancel()


def _split_interim(data: bytes) -> tuple[bytes, bytes]:
    """Split leading ``HTTP/1.1 100 Continue`` responses off ``data``: (interim, rest)."""
    interim = b""
    while data.startswith(b"HTTP/1.1 100 ") and b"\r\n\r\n" in data:
        head, _, data = data.partition(b"\r\n\r\n")
        interim += head + b"\r\n\r\n"
    return interim, data


def _reset(stream: trio.SocketStream) -> None:
    """Close ``stream`` with a TCP reset (SO_LINGER 0): the peer sees the connection drop."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()
    except OSError:
        pass
