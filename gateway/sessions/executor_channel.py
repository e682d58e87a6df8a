"""The session's executor channel: how its env-mcp learns the executors and gets tokens.

A task of the session's nursery, started before the child: it binds ``run/executors.sock`` in
the session's private runtime directory, hands the socket to the child's uid (``0600``), and
answers the protocol of ``gateway/envmcp/channel.py`` until the session stops. The capability
token secret stays in the gateway; env-mcp only ever holds one-executor tokens, minted here
per bridge connection.

Who may ask: the directory is ``0700`` and the socket ``0600``, both the child's uid, under a
session root only the child's group may pass; on top of that each connection's peer
credentials (``SO_PEERCRED``) must show the child's uid and a process that descends from the
session's child (``admits``), which also tells apart two sessions that share a uid where
isolation is off. Everything is bounded: ``MAX_CONCURRENT`` connections served at once (more
wait in the listen backlog), a token bucket of ``RATE_PER_SECOND``/``RATE_BURST`` requests,
``READ_TIMEOUT`` to send the request, ``ANSWER_TIMEOUT`` to answer it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import structlog
import trio

from gateway.envmcp.channel import (
    MAX_REQUEST_BYTES,
    ChannelError,
    GrantRequest,
    bind_unix_socket,
    encode_environments,
    encode_grant,
    encode_refusal,
    parse_request,
)
from gateway.executor_directory import ExecutorDirectory
from gateway.sessions.isolation import ChildIdentity
from gateway.sessions.process_tree import read_stat

log = structlog.get_logger(__name__)

MAX_CONCURRENT = 4
RATE_PER_SECOND = 10.0
RATE_BURST = 30
READ_TIMEOUT = 5.0
ANSWER_TIMEOUT = 10.0
ACCEPT_BACKOFF = 0.1
# How far up the parent chain a peer may be from the child (node shim, codex, env-mcp, …).
MAX_ANCESTRY = 32
_PEERCRED = struct.Struct("3i")

#: ``admits(pid, uid)``: ``None`` to serve the peer, else why it is refused.
PeerCheck = Callable[[int, int], str | None]


class TokenBucket:
    """``rate`` requests a second on average, ``burst`` at once; pure apart from the clock."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """Spend one request if there is one left."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def descends_from(pid: int, ancestor: int, *, limit: int = MAX_ANCESTRY) -> bool:
    """Whether ``pid`` is ``ancestor`` or below it (``/proc/<pid>/stat`` parent links)."""
    current = pid
    for _ in range(limit):
        if current == ancestor:
            return True
        stat = read_stat(current)
        if stat is None or stat.ppid <= 1:
            return False
        current = stat.ppid
    return False


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> tuple[int, int]:
    """The connecting process's pid and uid, as the kernel recorded them at ``connect``."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return pid, uid


async def serve_executor_channel(
    path: Path,
    directory: ExecutorDirectory,
    owner: ChildIdentity | None,
    admits: PeerCheck,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the channel at ``path`` until cancelled; ``started()`` once it accepts."""
    sock = await bind_unix_socket(str(path))
    try:
        if owner is not None:
            os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
        os.chmod(path, 0o600, follow_symlinks=False)
        listener = trio.SocketListener(sock)
        slots = trio.Semaphore(MAX_CONCURRENT)
        bucket = TokenBucket(RATE_PER_SECOND, RATE_BURST, trio.current_time)
        log.info("executor_channel.listening", path=str(path))
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of descriptors, say: the session goes on; env-mcp retries later.
                    slots.release()
                    log.warning("executor_channel.accept_failed", error=str(exc))
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                except BaseException:
                    slots.release()
                    raise
                nursery.start_soon(_serve_one, stream, directory, admits, bucket, slots)
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _serve_one(
    stream: trio.SocketStream,
    directory: ExecutorDirectory,
    admits: PeerCheck,
    bucket: TokenBucket,
    slots: trio.Semaphore,
) -> None:
    try:
        async with stream:
            answer = await _answer(stream, directory, admits, bucket)
            with trio.move_on_after(READ_TIMEOUT):
                await stream.send_all(answer)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("executor_channel.connection_lost", error=str(exc))
    finally:
        slots.release()


async def _answer(
    stream: trio.SocketStream,
    directory: ExecutorDirectory,
    admits: PeerCheck,
    bucket: TokenBucket,
) -> bytes:
    pid, uid = peer_credentials(stream.socket)
    refusal = admits(pid, uid)
    try:
        # Read even a refused peer's request: closing with it unread would reset the
        # connection, and the peer would never see why.
        raw = await _read_request(stream)
    except ChannelError as exc:
        if refusal is None:
            return encode_refusal(str(exc))
        raw = b""
    if refusal is not None:
        log.warning("executor_channel.refused", reason=refusal, pid=pid, uid=uid)
        return encode_refusal(f"refused: {refusal}")
    if not bucket.take():
        log.warning("executor_channel.rate_limited", pid=pid)
        return encode_refusal("too many requests on the executor channel; slow down")
    try:
        request = parse_request(raw)
        with trio.fail_after(ANSWER_TIMEOUT):
            if isinstance(request, GrantRequest):
                grant = await directory.grant(request.environment_id)
                log.info("executor_channel.granted", exe_id=request.environment_id, pid=pid)
                return encode_grant(grant)
            return encode_environments(await directory.environments())
    except ChannelError as exc:
        log.info("executor_channel.request_refused", reason=str(exc), pid=pid)
        return encode_refusal(str(exc))
    except trio.TooSlowError:
        return encode_refusal("the session could not answer in time; try again")


async def _read_request(stream: trio.SocketStream) -> bytes:
    buffer = bytearray()
    with trio.move_on_after(READ_TIMEOUT) as deadline:
        while b"\n" not in buffer:
            chunk = await stream.receive_some(MAX_REQUEST_BYTES + 1)
            if not chunk:
                raise ChannelError("request ended without a newline")
            buffer += chunk
            if len(buffer) > MAX_REQUEST_BYTES + 1:
                raise ChannelError(f"request larger than {MAX_REQUEST_BYTES} bytes")
    if deadline.cancelled_caught:
        raise ChannelError(f"no complete request within {READ_TIMEOUT:g}s")
    line, _, rest = bytes(buffer).partition(b"\n")
    if rest:
        raise ChannelError("one request per connection")
    return line
