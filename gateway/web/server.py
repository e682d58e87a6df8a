"""Hypercorn (trio worker) run programmatically inside the daemon's own ``trio.run``.

Listen addresses mean what they meant to the Go service (``net.Listen("tcp", addr)``): a
wildcard host (``:PORT``, ``0.0.0.0:PORT``, ``[::]:PORT``) is every interface of both families,
served by one dual-stack IPv6 socket (``IPV6_V6ONLY`` off, so IPv4 clients arrive as mapped
addresses, and ``:0`` gets one port for both); on a host without IPv6 it degrades to IPv4 with
one log line. Any other host (``127.0.0.1``, ``[::1]``, a name) is bound as given.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Callable
from typing import Any

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from gateway.config import Config, split_listen_addr

log = structlog.get_logger(__name__)

# How long Hypercorn lets in-flight HTTP requests finish after the shutdown trigger. WebSocket
# clients are already closed by the drain by then.
GRACEFUL_TIMEOUT_SECONDS = 3.0
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
# What socket(AF_INET6) or bind("::") fail with on a kernel without IPv6.
_NO_IPV6_ERRNOS = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL})

SocketFactory = Callable[[int, int], socket.socket]


def hypercorn_config(config: Config, listen_addr: str) -> HypercornConfig:
    """Hypercorn settings derived from ours: message size, pings, dead-client detection."""
    settings = HypercornConfig()
    settings.bind = [_explicit_bind(listen_addr)]
    settings.websocket_max_message_size = config.ws_max_message_size
    settings.graceful_timeout = GRACEFUL_TIMEOUT_SECONDS
    settings.accesslog = logging.getLogger("hypercorn.access")
    settings.errorlog = logging.getLogger("hypercorn.error")
    if config.ws_ping_interval > 0:
        settings.websocket_ping_interval = config.ws_ping_interval
        # Hypercorn's pings have no pong timeout; a live client answers every ping, so a
        # connection from which nothing arrives for two and a half intervals is dead.
        settings.read_timeout = math.ceil(config.ws_ping_interval * 2.5)
    return settings


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


async def serve_http(
    app: Any,
    settings: HypercornConfig,
    listen_addr: str,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen_addr`` until ``shutdown`` is set; reports the bound URLs."""
    settings.bind = bind_addresses(listen_addr)
    await serve(app, settings, shutdown_trigger=shutdown.wait, task_status=task_status)
