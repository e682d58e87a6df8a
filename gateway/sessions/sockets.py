"""Non-blocking stdlib sockets driven straight from Trio's I/O waits: the tunnel's hot path.

Trio's ``SocketStream`` adds a conflict detector, a checkpoint and a wrapper call to every
read and write. The tunnel moves every byte of every client, so its two sockets are plain
non-blocking ``socket.socket`` objects: a read or write is tried first and only waits
(``wait_readable``/``wait_writable``) when the kernel says it would block.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket

import trio
from trio.lowlevel import notify_closing, wait_readable, wait_writable


def take_socket(stream: trio.SocketStream) -> socket.socket:
    """The stream's connection as a non-blocking stdlib socket (the stream is unusable after)."""
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    return sock


def address_family(host: str) -> socket.AddressFamily | None:
    """The family of an IP literal; ``None`` for a name (which needs a lookup)."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    return socket.AF_INET6 if version == 6 else socket.AF_INET


async def connect(
    host: str, port: int, family: socket.AddressFamily | None = None
) -> socket.socket:
    """A connected non-blocking TCP socket (``TCP_NODELAY`` set) to ``host``:``port``.

    An IP literal (what a child's banner names) is connected to straight away, with no name
    lookup, no worker thread and no extra scheduling pass when loopback completes the handshake
    during the call; any other host goes through Trio's resolver and happy eyeballs.
    ``family``: ``address_family(host)``, when the caller has it already.
    """
    if family is None:
        family = address_family(host)
        if family is None:
            return take_socket(await trio.open_tcp_stream(host, port))
    sock, error = _begin_connect(host, port, family)
    try:
        if error == errno.EINPROGRESS:
            await wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, f"connect to {host}:{port}: {os.strerror(error)}")
    except BaseException:
        close_socket(sock)
        raise
    return sock


def connect_at_once(host: str, port: int, family: socket.AddressFamily) -> socket.socket | None:
    """A connection to the IP literal ``host`` if it completes within the call (loopback's
    does), else ``None``; never waits, so it may run where no wait is allowed."""
    try:
        sock, error = _begin_connect(host, port, family)
    except OSError:
        return None  # out of descriptors, say: nothing is kept ready this time
    if error:
        close_socket(sock)
        return None
    return sock


def _begin_connect(host: str, port: int, family: socket.AddressFamily) -> tuple[socket.socket, int]:
    """A non-blocking TCP socket (``TCP_NODELAY`` set) whose connect to ``host``:``port`` has
    begun, and its state: 0 connected (loopback usually is, within the call), ``EINPROGRESS``
    still connecting, or the error. The socket is closed if this raises."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex((host, port))
        if error == errno.EINPROGRESS:
            try:
                sock.getpeername()  # OSError (ENOTCONN) while still connecting
            except OSError:
                return sock, errno.EINPROGRESS
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except BaseException:
        close_socket(sock)
        raise
    return sock, error


async def recv(sock: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes; ``b""`` at end of stream."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await wait_readable(sock)


async def send_all(sock: socket.socket, data: bytes | bytearray | memoryview) -> bool:
    """Write everything; returns whether the write had to wait (a scheduling point passed)."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return False
    view = memoryview(data)[sent:]
    while view:
        await wait_writable(sock)
        try:
            sent = sock.send(view)
        except BlockingIOError:
            continue
        view = view[sent:]
    return True


async def drain_to_eof(sock: socket.socket) -> None:
    """Read until the peer closes, so that nothing unread turns our close into a reset."""
    try:
        while await recv(sock, 65536):
            pass
    except OSError:
        pass


def close_socket(sock: socket.socket | None) -> None:
    """Close ``sock`` (once), telling Trio first so no task waits on a closed descriptor."""
    if sock is not None and sock.fileno() >= 0:
        notify_closing(sock)
        sock.close()
