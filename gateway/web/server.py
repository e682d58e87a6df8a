"""The HTTP front door: one port, the tunnel for relay upgrades, Hypercorn for everything else.

::

    serve_http
    ├── accept loop (trio.serve_listeners)
    └── connections nursery (the graceful-shutdown deadline is set on it)
        └── per connection: read the first request head (bounded in size and time), then
            ├── WebSocketEndpoint.serve       a WebSocket upgrade on / or /codex-app/ws
            └── Hypercorn's TCPServer.run     anything else, replaying the bytes already read

Hypercorn serves health, readiness, metrics and admin, and any later request on a kept-alive
connection; its WebSocket support is not used (the ASGI app refuses a WebSocket that reaches it:
an upgrade after an earlier request, or over HTTP/2). One connection's exception — Hypercorn's
or the tunnel's — is logged and ends that connection only (pgjones/hypercorn#225); cancellation
still propagates, so shutdown works as before.

The front door builds Hypercorn's per-connection ``TCPServer`` itself, an internal API, so it
refuses to run with any Hypercorn other than the version it was written against.

Listen addresses mean what they meant to the Go service (``net.Listen("tcp", addr)``): a
wildcard host (``:PORT``, ``0.0.0.0:PORT``, ``[::]:PORT``) is every interface of both families,
served by one dual-stack IPv6 socket (``IPV6_V6ONLY`` off, so IPv4 clients arrive as mapped
addresses, and ``:0`` gets one port for both); on a host without IPv6 it degrades to IPv4 with
one log line. Any other host (``127.0.0.1``, ``[::1]``, a name) is bound as given.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from importlib import metadata
from typing import Any

import structlog
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import repr_socket_addr

from gateway.config import Config, split_listen_addr
from gateway.sessions.handshake import (
    MAX_HEAD,
    RequestHead,
    head_end,
    is_relay_upgrade,
    parse_request_head,
    plain_response,
)
from gateway.sessions.sockets import close_socket, recv, send_all, take_socket

log = structlog.get_logger(__name__)

HYPERCORN_VERSION = "0.18.0"
# How long Hypercorn lets in-flight HTTP requests finish after the shutdown trigger. WebSocket
# clients are already closed by the drain by then.
GRACEFUL_TIMEOUT_SECONDS = 3.0
# The first request head must arrive within this (a slowloris upgrade holds nothing longer).
HEAD_TIMEOUT_SECONDS = 10.0
# A request that stalls mid-body on a Hypercorn route is dropped after this.
READ_TIMEOUT_SECONDS = 60
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
# What socket(AF_INET6) or bind("::") fail with on a kernel without IPv6.
_NO_IPV6_ERRNOS = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL})

SocketFactory = Callable[[int, int], socket.socket]

# Serves a relay upgrade: the connection (a non-blocking stdlib socket, the handler's to close),
# its first request head and the bytes read after it.
UpgradeHandler = Callable[[socket.socket, RequestHead, bytes], Awaitable[None]]


class HypercornVersionError(RuntimeError):
    """The installed Hypercorn is not the one the front door was written for."""


def check_hypercorn_version() -> None:
    """Refuse to serve with a Hypercorn whose internals may differ from the pinned one."""
    installed = metadata.version("hypercorn")
    if installed != HYPERCORN_VERSION:
        raise HypercornVersionError(
            f"hypercorn {installed} is installed but the gateway needs exactly "
            f"{HYPERCORN_VERSION}; install the pinned version (constraints.txt)"
        )


def hypercorn_config(config: Config, listen_addr: str) -> HypercornConfig:
    """Hypercorn settings for the plain HTTP routes."""
    settings = HypercornConfig()
    settings.bind = [_explicit_bind(listen_addr)]
    settings.graceful_timeout = GRACEFUL_TIMEOUT_SECONDS
    settings.read_timeout = READ_TIMEOUT_SECONDS
    settings.accesslog = logging.getLogger("hypercorn.access")
    settings.errorlog = logging.getLogger("hypercorn.error")
    return settings


class BindError(Exception):
    """The listen address cannot be bound (in use, not local, not permitted)."""


def _explicit_bind(listen_addr: str) -> str:
    host, port = split_listen_addr(listen_addr)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_addresses(listen_addr: str, create_socket: SocketFactory = socket.socket) -> list[str]:
    """Hypercorn ``bind`` entries for ``listen_addr`` (see the module docstring).

    A wildcard address is bound here, as one dual-stack socket handed to Hypercorn as
    ``fd://N``; on a host without IPv6 it becomes ``0.0.0.0:PORT``.
    """
    host, port = split_listen_addr(listen_addr)
    if host not in WILDCARD_HOSTS:
        return [_explicit_bind(listen_addr)]
    try:
        sock = create_socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno not in _NO_IPV6_ERRNOS:
            raise
        return [_ipv4_only(listen_addr, port, exc)]
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("::", port))
    except OSError as exc:
        sock.close()
        if exc.errno not in _NO_IPV6_ERRNOS:
            raise
        return [_ipv4_only(listen_addr, port, exc)]
    # Hypercorn takes the descriptor over (and closes it when it stops serving).
    return [f"fd://{sock.detach()}"]


def _ipv4_only(listen_addr: str, port: int, exc: OSError) -> str:
    log.warning(
        "listen.ipv4_only",
        listen_addr=listen_addr,
        reason=f"this host has no IPv6 ({exc.strerror or exc})",
    )
    return f"0.0.0.0:{port}"


class ReplayStream(trio.abc.HalfCloseableStream):
    """A connection whose first bytes were already read: they are returned first, once."""

    def __init__(self, stream: trio.SocketStream, replay: bytes) -> None:
        self._stream = stream
        self._replay = replay
        self.socket = stream.socket  # Hypercorn reads the peer's address from it

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The replayed bytes, then the connection's."""
        if self._replay:
            data, self._replay = self._replay, b""
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write to the connection."""
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """As the connection's."""
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """As the connection's."""
        await self._stream.send_eof()

    async def aclose(self) -> None:
        """Close the connection."""
        await self._stream.aclose()


async def read_first_head(sock: socket.socket) -> tuple[bytes, RequestHead | None]:
    """Read until the first request head is complete, or until it cannot be a relay upgrade.

    Returns the bytes read and the parsed head (``None`` when it is not a complete, well-formed
    ``GET``; Hypercorn then answers as HTTP says). Raises ``trio.TooSlowError`` when a ``GET``
    head does not complete within ``HEAD_TIMEOUT_SECONDS`` and ``ValueError`` when it exceeds
    ``MAX_HEAD`` bytes. ``sock`` is the connection as a non-blocking stdlib socket: read
    straight, as the tunnel reads it (no stream wrapper, no extra scheduling pass per read).
    """
    received = b""
    with trio.fail_after(HEAD_TIMEOUT_SECONDS):
        while True:
            try:
                chunk = await recv(sock, MAX_HEAD)
            except OSError:
                chunk = b""  # reset before the head was complete: nothing to answer
            if not chunk:
                return received, None
            received += chunk
            if not received.startswith(b"GET "[: len(received)]):
                return received, None
            end = head_end(received)
            if end >= 0:
                return received, parse_request_head(received[:end])
            if len(received) > MAX_HEAD:
                raise ValueError("request head too large")


def as_stream(sock: socket.socket) -> trio.SocketStream:
    """A taken connection as a Trio stream again (for Hypercorn)."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


class FrontDoor:
    """Per-connection dispatch between the tunnel and Hypercorn."""

    def __init__(
        self, app: Any, settings: HypercornConfig, upgrades: UpgradeHandler | None
    ) -> None:
        self._app = ASGIWrapper(app)
        self._settings = settings
        self._upgrades = upgrades
        self.context = WorkerContext(None)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one TCP connection; its errors end it and nothing else."""
        # The connection as a plain socket from here on (the stream is left empty). It is
        # closed here unless a relay upgrade took it: then it is the upgrade handler's.
        sock = take_socket(stream)
        handed_over = False
        try:
            try:
                upgrade = await self._dispatch(sock)
                if upgrade is not None:
                    assert self._upgrades is not None
                    handed_over = True
                    await self._upgrades(sock, *upgrade)
            except* Exception as group:
                # Cancellation (a BaseException) is not caught here and still propagates.
                errors = [type(error).__name__ for error in group.exceptions]
                log.warning("http.connection_error", errors=errors, detail=str(group)[:200])
        finally:
            if not handed_over:
                close_socket(sock)

    async def _dispatch(self, sock: socket.socket) -> tuple[RequestHead, bytes] | None:
        """Serve the connection unless it is a relay upgrade: then its head and what followed."""
        if self._upgrades is None:
            await self._hypercorn(sock, b"")
            return None
        try:
            received, request = await read_first_head(sock)
        except trio.TooSlowError:
            await _answer(sock, 408, "the request head did not arrive in time")
            return None
        except ValueError:
            await _answer(sock, 431, f"the request head is larger than {MAX_HEAD} bytes")
            return None
        if request is not None and is_relay_upgrade(request):
            return request, received[head_end(received) :]
        await self._hypercorn(sock, received)
        return None

    async def _hypercorn(self, sock: socket.socket, received: bytes) -> None:
        stream = as_stream(sock)
        replay: Any = ReplayStream(stream, received)  # Hypercorn types it as an SSLStream
        server = TCPServer(self._app, self._settings, self.context, {}, replay)
        try:
            await server.run()
        finally:
            # Hypercorn closes its stream; the socket is closed with it (handle's close_socket
            # then finds it closed already).
            await trio.aclose_forcefully(stream)


async def _answer(sock: socket.socket, status: int, message: str) -> None:
    """Answer ``status`` with ``message`` (within a second) and close the connection."""
    with trio.move_on_after(1):
        with contextlib.suppress(OSError):
            await send_all(sock, plain_response(status, message))
    close_socket(sock)


async def serve_http(
    app: Any,
    settings: HypercornConfig,
    listen_addr: str,
    shutdown: trio.Event,
    *,
    upgrades: UpgradeHandler | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen_addr`` (relay upgrades too, if given) until ``shutdown``.

    Reports the bound URLs once listening. A failure to bind is a ``BindError`` with one
    sentence naming the address, so the command line can say it in one line, not a traceback.
    """
    check_hypercorn_version()
    try:
        settings.bind = bind_addresses(listen_addr)
        sockets = settings.create_sockets()
    except OSError as error:
        raise BindError(f"cannot listen on {listen_addr}: {error.strerror or error}") from None
    door = FrontDoor(app, settings, upgrades)
    listeners = []
    binds = []
    for sock in sockets.insecure_sockets:
        sock.listen(settings.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
    async with trio.open_nursery() as connections:
        try:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    partial(trio.serve_listeners, handler_nursery=connections),
                    door.handle,
                    listeners,
                )
                task_status.started(binds)
                await shutdown.wait()
                accepting.cancel_scope.cancel()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            await door.context.terminated.set()
            connections.cancel_scope.deadline = trio.current_time() + (
                settings.graceful_timeout if math.isfinite(settings.graceful_timeout) else 0
            )


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a (nested) group that is not itself a group."""
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
