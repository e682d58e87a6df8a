"""One attached client, tunnelled to its own connection to the session's child.

The front door's task calls ``ClientRelay.open``: it opens a TCP connection to the child,
forwards the client's upgrade (with the session's capability token instead of the client's)
and waits for the child's ``101``. The session then starts ``ClientRelay.run`` in its own
nursery and passes the ``101`` on in the same step; from then on bytes flow both ways without
being re-framed:

* **child → client** is a byte copy. A frame-*header* tracker follows frame boundaries, so the
  gateway's own frames (pings, a policy's refusal, its close) go in between two of the child's
  frames, never inside one.
* **client → child** reads whole messages — unmasked for the access policy, which checks every
  complete message — and forwards the client's original frames unchanged. Only one read buffer
  is held per direction; a frame larger than that is held whole until checked and written, its
  bytes taken from the daemon-wide ``InflightBudget`` first. A child that does not read stops
  the relay reading its client: backpressure reaches the sender.

Close frames are end to end (the client's code and reason reach the child, the child's reach
the client). The gateway closes with its own code only when it ends the connection itself:
1009 for a message over ``CXG_WS_MAX_MESSAGE_SIZE``, 1002/1007 for a broken frame, 1011 when
the child's connection drops, and whatever the session's stop reason says (1001, 1011, 1012).
Whatever happens to this one client, the session and its other clients go on: nothing raised
here after start reaches the session's nursery.
"""

from __future__ import annotations

import functools
import math
import socket
import threading
from collections.abc import Awaitable, Callable
from time import monotonic as _monotonic
from urllib.parse import urlsplit

import structlog
import trio
from prometheus_client import Counter
from trio.lowlevel import checkpoint, wait_writable

from gateway import metrics
from gateway.policy import ClientPolicy
from gateway.policy.client_policy import Refusal
from gateway.sessions import frames
from gateway.sessions.budget import InflightBudget
from gateway.sessions.frames import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PONG,
    TEXT,
    FrameError,
    Header,
)
from gateway.sessions.handshake import MAX_HEAD, RequestHead, child_upgrade_request, head_end
from gateway.sessions.handshake import response_status as _response_status
from gateway.sessions.reactor import Reactor
from gateway.sessions.sockets import (
    address_family,
    close_socket,
    connect,
    connect_at_once,
    drain_to_eof,
    recv,
    send_all,
)

log = structlog.get_logger(__name__)

CHILD_CONNECT_TIMEOUT = 10.0
# How long a closing handshake (and the gateway's own close) may take before TCP is dropped.
CLOSE_TIMEOUT = 2.0
# One read of a socket; a client frame larger than this is read into a buffer of its own.
RECEIVE_BUFFER = 64 * 1024
# A client that holds part of a fragmented message and cannot get budget for the rest this long
# is closed (1013): otherwise such clients could hold the whole budget waiting for each other.
PARTIAL_MESSAGE_BUDGET_WAIT = 10.0
# How often the session's idle clock and the frame metrics are brought up to date.
TOUCH_INTERVAL = 0.5
# A client silent for this many ping intervals (pings unanswered) is dead.
DEAD_AFTER_SILENT_PINGS = 3
KEEPALIVE_PAYLOAD = b"cxg-keepalive"
# Codes a peer may put in a close frame (RFC 6455 §7.4); 1005/1006/1015 are reserved for
# "no code"/"abnormal" and must never be sent.
_UNSENDABLE = {1004, 1005, 1006, 1015}


@functools.cache
def _frame_counters(direction: str) -> tuple[Counter, Counter]:
    """The frame and byte counters of one direction (looked up by label once)."""
    return metrics.FRAMES.labels(direction=direction), metrics.FRAME_BYTES.labels(
        direction=direction
    )


def close_code_label(code: int | None) -> str:
    """The ``code`` label of a close: the codes RFC 6455 defines by number, an application's
    by range, anything else as ``invalid`` (a client picks its code, and every distinct label
    would be a series held for the daemon's life)."""
    if code is None:
        return "none"
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "invalid"


@functools.lru_cache(maxsize=64)
def _close_counter(side: str, code: int | None) -> Counter:
    """The close counter of one side and code (looked up by label once)."""
    return metrics.WS_CLOSES.labels(side=side, code=close_code_label(code))


@functools.lru_cache(maxsize=1024)
def _child_address(url: str) -> tuple[str, int, str, socket.AddressFamily | None]:
    """Host, port, request target and address family (``None``: a name) of a child's
    ``ws://`` URL, parsed once per child."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname or "127.0.0.1"
    return host, parts.port or 80, target, address_family(host)


def spare_connection(url: str) -> socket.socket | None:
    """A TCP connection to the child at ``url`` (its ``ws://`` banner) with nothing sent on
    it, if one opens at once (``None`` otherwise: the next client connects itself)."""
    host, port, _, family = _child_address(url)
    return connect_at_once(host, port, family) if family is not None else None


def still_open(sock: socket.socket) -> bool:
    """Whether an idle connection has neither been closed by its peer nor sent anything."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # end of stream, or bytes nobody asked for


def sendable_close(code: int | None, reason: str | None, *, fallback: int) -> tuple[int, str]:
    """A close code and reason that may legally be sent on, given what the other side said."""
    # A reason longer than 123 UTF-8 bytes does not fit a close frame, whichever code it goes with.
    sendable_reason = (reason or "").encode()[:123].decode("utf-8", "ignore")
    if code is None or code in _UNSENDABLE or not (1000 <= code <= 4999) or 1016 <= code < 3000:
        return fallback, sendable_reason
    return code, sendable_reason


# The read buffer of every relay's child→client copy. A read and the write of what it read
# follow each other with no scheduling point in between, so one buffer serves every relay of
# the event loop; bytes the client's socket does not take at once are copied out before the
# relay waits. Large enough that one read takes whatever a large frame has queued.
COPY_BUFFER = 1 << 20
_per_thread = threading.local()


def _copy_buffer() -> memoryview:
    """The copy buffer of the calling thread's event loop."""
    buffer: memoryview | None = getattr(_per_thread, "copy_buffer", None)
    if buffer is None:
        buffer = _per_thread.copy_buffer = memoryview(bytearray(COPY_BUFFER))
    return buffer


class ChildRejected(ConnectionError):
    """The child refused the WebSocket upgrade (``status`` is its HTTP status, if any)."""

    def __init__(self, status: int | None) -> None:
        super().__init__(f"the child refused the upgrade with HTTP {status}")
        self.status = status


class _PeerGone(Exception):
    """One side's TCP connection ended or failed (``side`` is "client" or "child")."""

    def __init__(self, side: str) -> None:
        super().__init__(side)
        self.side = side


class ClientRelay:
    """Tunnels one client connection to a fresh connection to the session's child."""

    def __init__(
        self,
        client: socket.socket,
        request: RequestHead,
        *,
        on_activity: Callable[[], None],
        max_message_size: int,
        ping_interval: float,
        budget: InflightBudget,
        policy: ClientPolicy,
        reactor: Reactor,
    ) -> None:
        self._client = client
        self._request = request
        self._on_activity = on_activity
        self._max_message_size = max_message_size
        self._ping_interval = ping_interval
        self._budget = budget
        self._policy = policy
        self._reactor = reactor
        self._child: socket.socket | None = None
        self._upgrade = b""  # the child's 101, until the client's socket has taken it
        self._early = b""
        # Set by the session once run() is its task's: the relay owns the client's socket.
        self.started = False
        self.finished = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self._pumps = trio.CancelScope()
        # Set by the session before cancelling, so the client learns why it was dropped.
        self.close_code = 1001
        self.close_reason = "session stopped"
        self._stopped = False
        # Only one writer of the client socket at a time; child→client holds this while the
        # client's stream is inside one of the child's frames. A semaphore, not a lock: the
        # reactor's task takes it on the child→client pump's behalf (see _child_ready).
        self._client_lock = trio.Semaphore(1, max_value=1)
        # Frame tracking and closing-handshake state.
        self._s2c = FrameTracker()
        self._s2c_holding = False  # child→client holds _client_lock (inside a child's frame)
        self._s2c_pending = b""  # read by the fast path, not yet taken by the client's socket
        # What a write to the client cancelled part way left unwritten: the close writes it
        # first, so that the client's stream never has a frame cut short inside it.
        self._client_owed = b""
        self._c2s_skip = 0  # payload bytes of a large client frame not read yet
        self._child_mid_frame = False
        self._c2s_rest: bytearray | None = None
        self._c2s_message = _Message()
        # Left by the client→child fast path for its pump: a frame the child's socket did not
        # take whole (and how much of it it took), and read bytes the fast path did not handle.
        self._c2s_unsent: tuple[bytes, int] | None = None
        self._c2s_handoff: bytes | None = None
        self._client_close_seen = False  # the client's close frame went to the child
        self._child_close_seen = False  # the child's close frame went to the client
        self._closed_client = False  # the gateway's own close frame went to the client
        # How the client's connection ended (who closed it, code, reason), for the log; the
        # first close wins (the child's answer to a client's close must not overwrite it).
        self._detached: tuple[str, int, str] | None = None
        self._client_gone = False
        self._child_gone = False
        self._client_dead = False
        self._client_reads = 0
        self._client_read_stalled = False
        self._last_touch = -math.inf
        self._counts = [0, 0, 0, 0]  # frames c2s, bytes c2s, frames s2c, bytes s2c

    def stop(self, code: int, reason: str) -> None:
        """Close this client with ``code``/``reason`` and end the relay."""
        self.close_code, self.close_reason = code, reason
        if self._detached is None:
            self._detached = ("gateway", code, reason)
        self._stopped = True
        self.cancel_scope.cancel()

    def _end(self, code: int, reason: str) -> None:
        """End the relay from inside with the gateway's own close code (the first reason wins:
        a session that stops its clients has set theirs before cancelling)."""
        if not self._stopped and trio.current_effective_deadline() != -math.inf:
            self.close_code, self.close_reason = code, reason
            if self._detached is None:
                self._detached = ("gateway", code, reason)
        self._pumps.cancel()

    # -- life -----------------------------------------------------------------------------------

    async def open(
        self, child_url: str, authorization: str, spare: socket.socket | None = None
    ) -> None:
        """Connect to the child and send it the client's upgrade; wait for its ``101``.

        Runs in the caller's task (the front door's), before the relay is handed to the
        session, so the client's first bytes meet no task switch on the way. ``spare``: a
        connection to the child opened ahead (``spare_connection``), used if the child has not
        closed it. Raises ``ConnectionError`` if the child cannot be reached or refuses; the
        child's socket is closed on any failure, cancellation included. The ``101`` is passed
        on by ``run`` (or by ``pass_on_upgrade`` just before it).
        """
        try:
            self._upgrade = await self._open(child_url, authorization, spare)
        except BaseException as exc:
            close_socket(self._child)
            self._child = None
            if isinstance(exc, (OSError, trio.TooSlowError)) and not isinstance(
                exc, ConnectionError
            ):
                raise ConnectionError(f"cannot connect to the session's codex: {exc!r}") from None
            raise

    def abandon(self) -> None:
        """Close the child's side of a relay that was opened but will not run."""
        close_socket(self._child)
        self._child = None

    def pass_on_upgrade(self) -> None:
        """Send the child's ``101`` to the client now, if the socket takes it at once.

        Called in the same step that hands the relay to its task, so the client's answer
        does not wait for that task's first turn; whatever the socket does not take (on a new
        connection, nothing) is left for ``run``.
        """
        upgrade = self._upgrade
        try:
            sent = self._client.send(upgrade)
        except OSError:  # full (it never is on a new connection) or failed
            sent = 0  # run() tries again with a wait, and sees a failure for what it is
        self._upgrade = upgrade[sent:]

    async def run(self) -> None:
        """Tunnel until one side ends, then close both (``open`` has succeeded before)."""
        try:
            with self.cancel_scope:
                try:
                    if self._upgrade:
                        await send_all(self._client, self._upgrade)
                        self._upgrade = b""
                    with self._pumps:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._child_to_client)
                            if self._ping_interval > 0:
                                nursery.start_soon(self._keepalive)
                            # This task is the client→child pump: one task fewer per client.
                            await self._client_to_child()
                except OSError:
                    self._client_gone = True  # the 101 could not be written
                except Exception as exc:
                    # One client's failure stays with that client.
                    log.warning("relay.error", error=repr(exc)[:300])
                    self.close_code, self.close_reason = 1011, "gateway relay error"
        finally:
            try:
                await self._finish()
            finally:
                self._flush_counts()
                self._log_detached()
                self.finished.set()

    def _log_detached(self) -> None:
        closed_by, code, reason = self._detached or (
            "child" if self._child_close_seen else "gateway",
            self.close_code,
            self.close_reason,
        )
        log.info("client.detached", closed_by=closed_by, code=code, reason=reason)

    async def _open(self, url: str, authorization: str, spare: socket.socket | None) -> bytes:
        host, port, target, family = _child_address(url)
        request = child_upgrade_request(self._request, f"{host}:{port}", target, authorization)
        if spare is not None and not still_open(spare):
            close_socket(spare)
            spare = None
        with trio.fail_after(CHILD_CONNECT_TIMEOUT):
            while True:
                child = spare if spare is not None else await connect(host, port, family)
                self._child = child
                try:
                    await send_all(child, request)
                    received = await self._read_upgrade_answer(child)
                except ChildRejected:
                    raise
                except OSError:
                    if spare is None:
                        raise
                    # The child closed the kept connection just now: once more, afresh.
                    close_socket(spare)
                    spare = self._child = None
                    continue
                break
        end = head_end(received)
        if _response_status(received[:end]) != 101:
            raise ChildRejected(_response_status(received[:end]))
        # What followed the 101 is the child's first frames.
        self._early = received[end:]
        # The child's 101 (its Sec-WebSocket-Accept answers the client's own key).
        return received[:end]

    @staticmethod
    async def _read_upgrade_answer(child: socket.socket) -> bytes:
        """The child's answer to the upgrade: its head, and whatever followed it in the read."""
        received = b""
        while head_end(received) < 0:
            if len(received) > MAX_HEAD:
                raise ChildRejected(None)
            chunk = await recv(child, RECEIVE_BUFFER)
            if not chunk:
                raise ConnectionError("the child closed the connection during the upgrade")
            received += chunk
        return received

    # -- child → client: byte copy with a frame-header tracker ----------------------------------

    def _child_ready(self) -> bool:
        """The child→client fast path, run by the reactor when the child's socket is ready.

        Reads what is queued and writes it to the client in the same call. Returns ``False``
        (the pump takes over) when the client's socket is another writer's, when the child's
        stream ended or failed, or when the client's socket did not take everything at once
        (the rest is left in ``_s2c_pending``).
        """
        if self._s2c_holding:
            pass  # the child's own frame in progress: this path holds the client's socket
        elif self._client_lock.value == 0:
            return False  # a ping or a refusal is being written: wait for it in the pump
        child, client = self._child, self._client
        assert child is not None
        buffer = _copy_buffer()
        try:
            received = child.recv_into(buffer)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not received:
            return False  # end of stream: the pump reads it again and ends the relay
        data = buffer[:received]
        # _account_child_bytes, inline: one call less on every read of the fast path.
        tracker, counts = self._s2c, self._counts
        counts[2] += tracker.feed(data)
        counts[3] += received
        if tracker.close_seen and not self._child_close_seen:
            self._child_close_seen = True
            self._closing_started()
        try:
            try:
                sent = client.send(data)
            except BlockingIOError:
                sent = 0
        except OSError:
            self._client_gone = True
            self._pumps.cancel()
            return True
        if sent != received:
            self._s2c_pending = bytes(data[sent:])  # the shared buffer is not kept
            self._hold_client_socket(True)
            return False
        if tracker.remaining or tracker.partial or self._s2c_holding:
            self._hold_client_socket(not tracker.at_boundary)
        if _monotonic() - self._last_touch >= TOUCH_INTERVAL:
            self._touch()
        return True

    def _account_child_bytes(self, data: memoryview | bytes) -> None:
        """Follow the child's frames through ``data``; count them; note its close frame."""
        tracker, counts = self._s2c, self._counts
        counts[2] += tracker.feed(data)
        counts[3] += len(data)
        if tracker.close_seen and not self._child_close_seen:
            self._child_close_seen = True
            self._closing_started()

    def _hold_client_socket(self, hold: bool) -> None:
        """Take or give back the client's socket for child→client (never waits: see callers)."""
        if hold and not self._s2c_holding:
            self._client_lock.acquire_nowait()
            self._s2c_holding = True
        elif not hold and self._s2c_holding:
            self._client_lock.release()
            self._s2c_holding = False

    async def _child_to_client(self) -> None:
        child, client, lock = self._child, self._client, self._client_lock
        assert child is not None
        child_fd = child.fileno()  # waited on by number: one call less per wait
        wait_for_child = functools.partial(self._reactor.wait_readable, child_fd, self._child_ready)
        buffer = _copy_buffer()
        capacity = len(buffer)
        data: bytes | memoryview = self._early
        self._early = b""
        # A short read has most likely emptied the socket: the next pass waits for it first
        # rather than trying a read that would only fail with EAGAIN.
        drained = not data
        try:
            while True:
                # Every pass reaches a scheduling point: the wait for the socket, a write that
                # had to wait, or the explicit checkpoint at the end.
                waited = False
                accounted = False
                if not data:
                    if drained:
                        await wait_for_child()
                        waited = True
                        # The fast path read and accounted for these; the client's socket did
                        # not take them at once.
                        data, self._s2c_pending = self._s2c_pending, b""
                        accounted = bool(data)
                    if not data:
                        try:
                            received = child.recv_into(buffer)
                        except BlockingIOError:
                            drained = True
                            continue
                        except OSError:
                            received = 0
                        if not received:
                            self._child_gone = True
                            self._end(1011, "codex app-server connection lost")
                            return
                        drained = received < capacity
                        data = buffer[:received]
                # The shared buffer must not be waited on: what is not written at once is copied.
                if not self._s2c_holding and lock.value == 0:
                    data = bytes(data)
                    # At a frame boundary here: bytes dropped by a cancellation of this wait
                    # were never counted in, so the close still goes in at that boundary.
                    await lock.acquire()
                    self._s2c_holding = waited = True
                if not accounted:
                    self._account_child_bytes(data)
                try:
                    try:
                        sent = client.send(data)
                    except BlockingIOError:
                        sent = 0
                    if sent != len(data):
                        rest = bytes(data[sent:])
                        data = b""
                        self._hold_client_socket(True)
                        await self._write_client(rest)
                        waited = True
                except OSError:
                    self._client_gone = True
                    self._pumps.cancel()
                    return
                data = b""
                # Only a child's frame cut by this read keeps the client's stream to itself.
                self._hold_client_socket(not self._s2c.at_boundary)
                self._touch()
                if not waited and not drained:
                    await checkpoint()
        finally:
            self._hold_client_socket(False)

    # -- client → child: whole messages, checked, original frames forwarded ---------------------

    def _client_ready(self) -> bool:
        """The client→child fast path, run by the reactor when the client's socket is ready.

        Reads once; every whole, unfragmented data message in the read is checked by the
        policy and its original frame written to the child, in this call. Returns ``False``
        (the pump takes over) at the first frame it does not finish: a frame cut by the read, a
        control or fragmented frame, a message the policy refuses or that is too large or not
        UTF-8 (the pump checks it again and answers), a write the child's socket did not take
        whole (``_c2s_unsent``). What it read and did not handle is left in ``_c2s_handoff``.
        """
        if self._c2s_rest is not None or self._c2s_message.active:
            return False  # in the middle of something only the pump follows
        client, child = self._client, self._child
        assert child is not None
        try:
            data = client.recv(RECEIVE_BUFFER)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False  # end of stream: the pump reads it again and ends the relay
        self._client_reads += 1
        counts, check, max_size = self._counts, self._policy.check, self._max_message_size
        reads_binary = self._policy.reads_binary
        position, size = 0, len(data)
        while position < size:
            # The header read here, not by frames.parse_header: only whole, unfragmented,
            # masked text or binary frames are taken (0x81/0x82 with no reserved bit set);
            # anything else is left to the pump, which parses and judges it in full.
            opcode = data[position] ^ 0x80
            if (opcode != TEXT and opcode != BINARY) or size - position < 6:
                break
            length = data[position + 1] ^ 0x80
            if length < 126:
                header_size = 6
            elif length == 126 and size - position >= 8:
                length = (data[position + 2] << 8) | data[position + 3]
                header_size = 8
            else:
                break  # unmasked (length >= 0x80 after the XOR), 64-bit length, or cut
            total = header_size + length
            if length > max_size or position + total > size:
                break
            raw = data if total == size else data[position : position + total]
            if opcode == TEXT or reads_binary:
                mask = data[position + header_size - 4 : position + header_size]
                payload = frames.apply_mask(memoryview(raw)[header_size:], mask)
                content: str | bytes = payload
                if opcode == TEXT:
                    try:
                        content = payload.decode()
                    except UnicodeDecodeError:
                        break
                if check(content) is not None:
                    break
            try:
                sent = child.send(raw)
            except BlockingIOError:
                sent = 0
            except OSError:
                break  # the pump writes it again and sees the child gone
            counts[0] += 1
            counts[1] += total
            position += total
            if sent != total:
                self._c2s_unsent = (raw, sent)
                break
        if position < size:
            self._c2s_handoff = data[position:]
        if self._c2s_unsent is not None or self._c2s_handoff is not None:
            return False
        if _monotonic() - self._last_touch >= TOUCH_INTERVAL:
            self._touch()
        return True

    async def _client_to_child(self) -> None:
        client, child = self._client, self._child
        assert child is not None
        client_fd = client.fileno()
        counts, check, max_size = self._counts, self._policy.check, self._max_message_size
        reads_binary = self._policy.reads_binary
        message: list[bytes | bytearray] = []  # raw frames of a fragmented message
        parts: list[bytes] = []  # their unmasked payloads
        state = self._c2s_message
        wait_for_client = functools.partial(
            self._reactor.wait_readable, client_fd, self._client_ready
        )
        drained = True  # as in _child_to_client
        try:
            while True:
                waited = False
                handoff = None
                if drained:
                    await wait_for_client()
                    waited = True
                    if self._c2s_unsent is not None:
                        unsent, sent = self._c2s_unsent
                        self._c2s_unsent = None
                        await self._to_child(unsent, sent)
                        del unsent
                    handoff, self._c2s_handoff = self._c2s_handoff, None
                if handoff is not None:
                    data = handoff  # read (and counted) by the fast path, left for this pump
                    drained = False
                else:
                    try:
                        data = client.recv(RECEIVE_BUFFER)
                    except BlockingIOError:
                        drained = True
                        continue
                    except OSError:
                        data = b""
                    self._client_reads += 1
                    if not data:
                        self._client_gone = True
                        self._pumps.cancel()
                        return
                    drained = len(data) < RECEIVE_BUFFER
                buffer: bytes | bytearray = data
                if self._c2s_rest is not None:
                    self._c2s_rest += data
                    buffer, self._c2s_rest = self._c2s_rest, None
                position, size = 0, len(buffer)
                while position < size:
                    header = frames.parse_header(buffer, position)
                    if header is None:
                        break
                    opcode, length, mask = header.opcode, header.length, header.mask
                    total = header.header_size + length
                    if mask is None:
                        raise FrameError("client frames must be masked")
                    if opcode < CLOSE:  # a data frame: the message's bounds and size
                        if opcode == CONTINUATION:
                            if not state.active:
                                raise FrameError("continuation frame without a message to continue")
                        elif state.active:
                            raise FrameError("new message before the previous one ended")
                        if state.size + length > max_size:
                            raise FrameError(
                                f"message larger than {max_size} bytes (CXG_WS_MAX_MESSAGE_SIZE)",
                                1009,
                            )
                    if position + total > size:
                        if total <= RECEIVE_BUFFER:
                            break
                        raw: bytes | bytearray = await self._read_large(
                            buffer, position, header, state
                        )
                        position = size
                        drained = True
                    else:
                        whole = position == 0 and total == size
                        raw = buffer if whole else buffer[position : position + total]
                        position += total
                    if header.fin and opcode in (TEXT, BINARY):
                        # The common case, a whole message in one frame: checked and forwarded
                        # here, without the bookkeeping of fragmented messages.
                        counts[0] += 1
                        counts[1] += total
                        if opcode == TEXT or reads_binary:
                            payload = frames.apply_mask(memoryview(raw)[header.header_size :], mask)
                            content: str | bytes = payload
                            if opcode == TEXT:
                                try:
                                    content = payload.decode()
                                except UnicodeDecodeError:
                                    raise FrameError(
                                        "text message is not valid UTF-8", 1007
                                    ) from None
                            refusal = check(content)
                            del content, payload
                            if refusal is not None:
                                waited |= await self._refused(refusal)
                                if state.budgeted:
                                    self._release_budget(state)
                                continue
                        try:
                            sent = child.send(raw)
                        except BlockingIOError:
                            sent = 0
                        except OSError:
                            self._child_gone = True
                            raise _PeerGone("child") from None
                        if sent != total:
                            waited |= await self._to_child(raw, sent)
                        if state.budgeted:
                            self._release_budget(state)
                        continue
                    waited |= await self._client_frame(header, raw, message, parts, state)
                    if self._client_close_seen:
                        return
                if position < size:
                    self._c2s_rest = bytearray(buffer[position:])
                # Nothing read stays referenced while the next read waits: a large frame is
                # paid for by the budget only until it has been written to the child.
                data = buffer = raw = b""
                self._touch()
                if not waited and not drained:
                    await checkpoint()
        except FrameError as error:
            self._end(error.code, str(error))
        except _PeerGone as gone:
            if gone.side == "client":
                self._client_gone = True
            self._pumps.cancel()
        finally:
            self._release_budget(state)

    def _release_budget(self, state: _Message) -> None:
        if state.budgeted:
            self._budget.release(state.budgeted)
            state.budgeted = 0

    async def _read_large(
        self, buffer: bytes | bytearray, position: int, header: Header, state: _Message
    ) -> bytearray:
        """Read a frame larger than one read buffer into its own, budgeted, buffer."""
        total = header.header_size + header.length
        await self._take_budget(header.length, state)
        frame = bytearray(total)
        have = len(buffer) - position
        frame[:have] = buffer[position:]
        view = memoryview(frame)
        client = self._client
        client_fd = client.fileno()

        def fill() -> bool:
            # In the reactor's task: read what has come; wake the pump once the frame is whole
            # (or the stream ends or fails: the pump's own read sees that).
            nonlocal have
            try:
                received = client.recv_into(view[have:])
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not received:
                return False
            self._client_reads += 1
            have += received
            self._c2s_skip = total - have
            return have < total

        while have < total:
            self._c2s_skip = total - have
            try:
                received = client.recv_into(view[have:])
            except BlockingIOError:
                await self._reactor.wait_readable(client_fd, fill)
                continue
            except OSError:
                received = 0
            self._client_reads += 1
            if not received:
                raise _PeerGone("client")
            have += received
        self._c2s_skip = 0
        return frame

    async def _take_budget(self, amount: int, state: _Message) -> None:
        self._client_read_stalled = True
        try:
            if state.budgeted:
                with trio.move_on_after(PARTIAL_MESSAGE_BUDGET_WAIT) as waited:
                    await self._budget.acquire(amount)
                if waited.cancelled_caught:
                    raise FrameError("gateway busy; retry the message later", 1013)
            else:
                await self._budget.acquire(amount)
        finally:
            self._client_read_stalled = False
        state.budgeted += amount

    async def _client_frame(
        self,
        header: Header,
        raw: bytes | bytearray,
        message: list[bytes | bytearray],
        parts: list[bytes],
        state: _Message,
    ) -> bool:
        """Handle a control frame or a fragment of a message; returns whether a write waited."""
        opcode, mask = header.opcode, header.mask
        assert mask is not None
        counts = self._counts
        counts[0] += 1
        counts[1] += len(raw)
        if opcode >= CLOSE:
            payload = frames.apply_mask(memoryview(raw)[header.header_size :], mask)
            if opcode == PONG and payload == KEEPALIVE_PAYLOAD:
                return False  # the answer to the gateway's own ping
            if opcode == CLOSE:
                code, reason = frames.parse_close(payload)
                _close_counter("client", code).inc()
                if self._detached is None:
                    self._detached = ("client", code or 1005, reason or "")
                if not self._stopped:
                    self.close_code, self.close_reason = sendable_close(code, reason, fallback=1000)
                self._client_close_seen = True
                self._closing_started()
            return await self._to_child(raw)
        if not state.active:
            state.active, state.opcode = True, opcode
        inspect = state.opcode == TEXT or self._policy.reads_binary
        if len(raw) <= RECEIVE_BUFFER:
            # Held past this read: it counts against the budget like a large frame.
            await self._take_budget(header.length, state)
            raw = bytes(raw)
        message.append(raw)
        if inspect:
            parts.append(frames.apply_mask(memoryview(raw)[header.header_size :], mask))
        state.size += header.length
        if not header.fin:
            return False
        refusal = None
        if inspect:
            payload = b"".join(parts)
            parts.clear()
            content = _text(payload) if state.opcode == TEXT else payload
            refusal = self._policy.check(content)
            # The unmasked copy is not what is forwarded: let it go before waiting on the child.
            del content, payload
        if refusal is not None:
            waited = await self._refused(refusal)
        else:
            waited = False
            for frame in message:
                waited |= await self._to_child(frame)
        message.clear()
        state.reset()
        self._release_budget(state)
        return waited

    async def _refused(self, refusal: Refusal) -> bool:
        """Count and log a refused message, answer it if it wants an answer; whether it waited."""
        metrics.POLICY_REFUSALS.labels(rule=refusal.rule).inc()
        log.warning("policy.refused", **dict(refusal.log_fields))
        if refusal.response is None:
            return False
        await self._to_client(frames.server_text(refusal.response))
        return True

    async def _to_child(self, data: bytes | bytearray, sent: int | None = None) -> bool:
        """Write ``data`` (``sent``: how much of it is written already); whether it waited."""
        child = self._child
        assert child is not None
        if sent is None:
            try:
                sent = child.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._child_gone = True
                raise _PeerGone("child") from None
        if sent == len(data):
            return False  # the common case: the kernel took it all at once
        self._child_mid_frame = True
        self._client_read_stalled = True
        try:
            waited = await send_all(child, memoryview(data)[sent:])
        except OSError:
            self._child_gone = True
            raise _PeerGone("child") from None
        finally:
            self._client_read_stalled = False
        self._child_mid_frame = False
        return waited

    async def _to_client(self, frame: bytes) -> None:
        async with self._client_lock:
            try:
                await self._write_client(frame)
            except OSError:
                self._client_gone = True
                raise _PeerGone("client") from None

    async def _write_client(self, data: bytes) -> None:
        """Write all of ``data`` to the client (the caller holds the client's socket).

        Cancelled part way, it leaves what it did not write in ``_client_owed`` for the close.
        """
        client = self._client
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = client.send(view)
                except BlockingIOError:
                    await wait_writable(client)
                    continue
                view = view[sent:]
        finally:
            if view:
                self._client_owed = bytes(view)

    # -- keepalive, activity, metrics -----------------------------------------------------------

    async def _keepalive(self) -> None:
        """Ping a quiet client; drop one that stays silent for several intervals."""
        interval = self._ping_interval
        seen, silent = self._client_reads, 0
        ping = frames.server_ping(KEEPALIVE_PAYLOAD)
        while True:
            await trio.sleep(interval)
            if self._client_reads != seen or self._client_read_stalled:
                seen, silent = self._client_reads, 0
                continue
            silent += 1
            if silent >= DEAD_AFTER_SILENT_PINGS:
                log.info("relay.client_dead", silent_seconds=silent * interval)
                self._client_dead = True
                self._end(1001, "client stopped answering pings")
                return
            lock = self._client_lock
            if lock.value == 0:
                continue  # the child's frame in progress keeps the connection busy anyway
            lock.acquire_nowait()
            try:
                await self._write_client(ping)
            except OSError:
                self._client_gone = True
                self._pumps.cancel()
                return
            finally:
                lock.release()

    def _touch(self) -> None:
        # The process's monotonic clock, not Trio's: this runs on every read, and the interval
        # only bounds how often the session and the metrics hear about it.
        now = _monotonic()
        if now - self._last_touch >= TOUCH_INTERVAL:
            self._last_touch = now
            self._on_activity()
            self._flush_counts()

    def _flush_counts(self) -> None:
        counts = self._counts
        if counts[0]:
            frames_c2s, bytes_c2s = _frame_counters("client_to_child")
            frames_c2s.inc(counts[0])
            bytes_c2s.inc(counts[1])
        if counts[2]:
            frames_s2c, bytes_s2c = _frame_counters("child_to_client")
            frames_s2c.inc(counts[2])
            bytes_s2c.inc(counts[3])
        counts[:] = [0, 0, 0, 0]

    def _closing_started(self) -> None:
        # A closing handshake under way must finish soon, whatever the peers do.
        deadline = trio.current_time() + CLOSE_TIMEOUT
        if deadline < self._pumps.deadline:
            self._pumps.deadline = deadline

    # -- the end --------------------------------------------------------------------------------

    async def _finish(self) -> None:
        """Send the close frames still owed (at frame boundaries), then close both sockets."""
        client, child = self._client, self._child
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._close_client_side()
                if not (self._child_gone or self._client_close_seen or self._child_mid_frame):
                    assert child is not None
                    try:
                        await send_all(child, frames.client_close(1000, ""))
                    except OSError:
                        self._child_gone = True
                drains: list[Callable[[], Awaitable[None]]] = []
                client_owes_close = not (
                    self._client_gone or self._client_dead or self._client_close_seen
                )
                if client_owes_close and (self._closed_client or self._child_close_seen):
                    # Wait for the client's answering close frame, then drop TCP.
                    drains.append(self._drain_client)
                if not self._child_gone and child is not None:
                    # The child, as the server, closes TCP once the handshake is done.
                    drains.append(functools.partial(drain_to_eof, child))
                if len(drains) == 1:
                    await drains[0]()  # the usual case: no task needed
                elif drains:
                    async with trio.open_nursery() as nursery:
                        for drain in drains:
                            nursery.start_soon(drain)
            except Exception as exc:
                log.debug("relay.close_error", error=repr(exc)[:200])
        close_socket(child)
        close_socket(client)

    async def _drain_client(self) -> None:
        """Read the client until its close frame (or EOF); whatever else it sends is dropped."""
        tracker = FrameTracker(self._c2s_skip)
        rest = self._c2s_rest
        try:
            if rest:
                tracker.feed(rest)
            while not tracker.close_seen:
                data = await recv(self._client, RECEIVE_BUFFER)
                if not data:
                    return
                tracker.feed(data)
        except OSError:
            pass

    async def _close_client_side(self) -> None:
        if self._client_gone or self._client_dead or self._child_close_seen:
            return
        tracker, child, client = self._s2c, self._child, self._client
        if tracker.partial or (tracker.remaining and self._child_gone):
            return  # inside a frame that cannot be finished: only dropping TCP is left
        async with self._client_lock:
            # What a cancelled write still owed the client (at most one of the two is left),
            # then the rest of the child's frame in progress; the close goes at its boundary.
            owed = self._client_owed or self._s2c_pending
            self._client_owed = self._s2c_pending = b""
            if owed:
                await send_all(client, owed)
            while tracker.remaining and child is not None:
                chunk = await recv(child, min(tracker.remaining, RECEIVE_BUFFER))
                if not chunk:
                    return
                tracker.remaining -= len(chunk)
                await send_all(client, chunk)
            code, reason = sendable_close(self.close_code, self.close_reason, fallback=1011)
            _close_counter("gateway", code).inc()
            await send_all(client, frames.server_close(code, reason))
            self._closed_client = True


class FrameTracker:
    """Follows frame boundaries through a byte stream without touching payloads."""

    __slots__ = ("close_seen", "partial", "remaining")

    def __init__(self, remaining: int = 0) -> None:
        self.remaining = remaining  # payload bytes of the current frame still to come
        self.partial = b""  # the start of a header split across reads
        self.close_seen = False

    @property
    def at_boundary(self) -> bool:
        """Whether the stream so far ends exactly between two frames."""
        return not self.remaining and not self.partial

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Account for ``data``; returns how many frames start in it."""
        size = len(data)
        remaining = self.remaining
        if remaining >= size:
            self.remaining = remaining - size
            return 0
        position = remaining
        if self.partial:
            # The header split across reads is parsed from its start.
            data = self.partial + data
            position = 0
            size = len(data)
            self.partial = b""
        started = 0
        while position < size:
            try:
                header = frames.parse_header(data, position)
            except FrameError:
                header = None
            if header is None:
                self.partial = bytes(data[position:])
                self.remaining = 0
                return started
            started += 1
            if header.opcode == CLOSE:
                self.close_seen = True
            position += header.header_size + header.length
        self.remaining = position - size
        return started


def _text(payload: bytes) -> str:
    """A text message's payload as the policy reads it (1007 if it is not UTF-8)."""
    try:
        return payload.decode()
    except UnicodeDecodeError:
        raise FrameError("text message is not valid UTF-8", 1007) from None


class _Message:
    """The client message being received (for fragmented messages)."""

    __slots__ = ("active", "budgeted", "opcode", "size")

    def __init__(self) -> None:
        self.active = False
        self.opcode = 0
        self.size = 0
        self.budgeted = 0

    def reset(self) -> None:
        self.active = False
        self.opcode = 0
        self.size = 0
