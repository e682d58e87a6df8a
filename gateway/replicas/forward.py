"""The forwarder: a connect for a workspace another pod owns is relayed to that pod.

The front door has verified the client (handshake, Origin, bearer token) and the session
manager said ``OwnedElsewhere``. ``Forwarder.open`` then opens TCP to the owner's internal
listener (``owner.peer_addr``), sends the client's upgrade — its WebSocket headers, a grant
signed for that owner (``grants.py``), never the client's bearer token — and reads the owner's
answer:

* ``101``: passed to the client verbatim (the child's accept key, subprotocol and extension
  headers, end to end); ``ForwardedClient.run`` then copies bytes both ways until either side
  ends;
* ``409``: the owner no longer holds the workspace at that epoch (``OwnerMoved``): the front
  door asks the session manager again, which re-reads the ownership record;
* anything else the owner answered with is passed to the client as the owner sent it (its own
  fixed sentences: draining, full, the client cap) — except a refused grant, which is this
  pod's or the operator's fault and becomes a 503;
* no answer (connect refused or timed out, the connection dropped): ``HopUnreachable``.

The relay copies bytes, never re-frames them: the owner's ``ClientRelay`` is the one that
checks messages (policy, ``CXG_WS_MAX_MESSAGE_SIZE``, the in-flight budget) and pings the
client, exactly as for a direct client. Each direction holds at most one read buffer and reads
again only once it is written, so a side that stops reading stops the other (backpressure
through both hops by construction). Frame-header trackers follow both streams, so when this pod
closes on its own — the hop died (1011), a drain (1001) — its close frames go in between
frames. A close from either end travels end to end. As the tunnel's, both pumps park their
socket with the daemon's ``Reactor``, whose task copies a read on at once (``_copy_ready``)
and wakes the pump only when the other socket does not take it whole or a stream ends.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Callable

import structlog
import trio
from trio.lowlevel import checkpoint, wait_writable

from gateway import metrics
from gateway.config import ReplicaSettings
from gateway.replicas.grants import GrantSigner
from gateway.replicas.placement import PeerOwner
from gateway.sessions import frames
from gateway.sessions.handshake import MAX_HEAD, RequestHead, head_end, response_status
from gateway.sessions.reactor import Reactor
from gateway.sessions.relay import CLOSE_TIMEOUT, FrameTracker, close_code_label
from gateway.sessions.sockets import close_socket, drain_to_eof, recv, send_all, take_socket

log = structlog.get_logger(__name__)

# The header carrying the grant on the hop (the owner's listener reads nothing else to trust).
GRANT_HEADER = "x-cxg-peer-grant"
# Which pod forwarded the connect (for the owner's logs; trusted for nothing).
FORWARDED_BY_HEADER = "x-cxg-forwarded-by"
# Headers of the client's upgrade that cross the hop: what the WebSocket handshake needs and
# what helps the logs. Authorization, cookies and Origin never do.
HOP_HEADERS = (
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "user-agent",
)
MAX_FORWARD_TRIES = 3
HOP_CONNECT_TIMEOUT = 3.0
# On top of the time the owner may take to start the session the connect waits for.
HOP_ANSWER_MARGIN = 30.0
# A refusal body from the owner is one sentence; anything longer is cut.
MAX_REFUSAL_BODY = 4096
RECEIVE_BUFFER = 64 * 1024
# TCP keepalive on the hop: an owner that vanishes without a FIN or RST (node lost, partition)
# is noticed within about IDLE + INTERVAL x COUNT seconds instead of never; the user timeout
# bounds the same for bytes sent to it and never acknowledged (retransmissions would otherwise
# go on for many minutes).
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 2, 3
USER_TIMEOUT_MS = (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT) * 1000
HOP_LOST = (1011, "connection to the pod serving this workspace was lost")
FORWARDER_DRAINING = (1001, "gateway shutting down")


class OwnerMoved(Exception):
    """The owner answered 409: it does not hold the workspace at the epoch it was sent for."""


class HopUnreachable(Exception):
    """The owner's internal listener could not be reached or gave no usable answer."""


class OwnerGone(HopUnreachable):
    """The owner stopped answering and has since been judged dead: claim the workspace anew."""


class HopRefused(Exception):
    """The owner refused the connect; ``response`` is its answer, passed to the client."""

    def __init__(self, status: int, response: bytes) -> None:
        super().__init__(f"the owner refused the forwarded connect with HTTP {status}")
        self.status = status
        self.response = response


def hop_request(request: RequestHead, peer_addr: str, grant: str, forwarded_by: str) -> bytes:
    """The client's upgrade as the owner's internal listener gets it."""
    lines = [
        f"GET {request.target} HTTP/1.1",
        f"Host: {peer_addr}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"X-Cxg-Peer-Grant: {grant}",
        f"X-Cxg-Forwarded-By: {forwarded_by}",
    ]
    lines += [f"{name}: {value}" for name, value in request.headers if name in HOP_HEADERS]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _split_peer_addr(peer_addr: str) -> tuple[str, int]:
    host, _, port = peer_addr.rpartition(":")
    return host.strip("[]"), int(port)


def _keep_alive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class Forwarder:
    """Opens hops to owners and keeps the forwarded clients of this pod (for the drain)."""

    def __init__(
        self,
        replicas: ReplicaSettings,
        *,
        answer_timeout: float,
        reactor: Reactor,
        owner_gone: Callable[[PeerOwner], bool] | None = None,
    ) -> None:
        self._pod = replicas.pod_name
        self._reactor = reactor
        self._signer = GrantSigner(replicas.peer_secret.reveal())
        self._answer_timeout = answer_timeout
        # An owner whose process stops answering (frozen, or its node partitioned after the
        # connect) is judged dead by the heartbeats long before ``answer_timeout``.
        self._owner_gone = owner_gone
        self._look_every = replicas.heartbeat_interval / 2
        self._clients: set[ForwardedClient] = set()
        self.draining = False

    async def open(
        self,
        client: socket.socket,
        request: RequestHead,
        *,
        workspace_id: str,
        user_id: str,
        owner: PeerOwner,
    ) -> ForwardedClient:
        """Open the hop to ``owner`` and pass its ``101`` to ``client``.

        Raises ``OwnerMoved`` (409), ``HopRefused`` (any other answer) or ``HopUnreachable``.
        """
        grant = self._signer.sign(
            workspace_id=workspace_id, user_id=user_id, epoch=owner.epoch, pod=owner.pod
        )
        hop: socket.socket | None = None
        try:
            host, port = _split_peer_addr(owner.peer_addr)
            try:
                with trio.fail_after(HOP_CONNECT_TIMEOUT):
                    hop = take_socket(await trio.open_tcp_stream(host, port))
            except (OSError, trio.TooSlowError) as exc:
                metrics.HOP_FAILURES.labels(stage="connect").inc()
                raise HopUnreachable(f"cannot connect to {owner.peer_addr}: {exc!r}") from None
            _keep_alive(hop)
            try:
                with trio.fail_after(self._answer_timeout):
                    head, early = await self._answer_unless_gone(
                        hop, hop_request(request, owner.peer_addr, grant, self._pod), owner
                    )
            except (OSError, trio.TooSlowError, EOFError, ValueError) as exc:
                metrics.HOP_FAILURES.labels(stage="upgrade").inc()
                raise HopUnreachable(f"no answer from {owner.peer_addr}: {exc!r}") from None
            status = response_status(head)
            if status is None:
                metrics.HOP_FAILURES.labels(stage="upgrade").inc()
                raise HopUnreachable(f"{owner.peer_addr} answered something that is not HTTP/1.1")
            if status == 409:
                raise OwnerMoved(f"{owner.pod} does not hold the workspace at epoch {owner.epoch}")
            if status != 101:
                with trio.move_on_after(1):
                    early += await _read_body(hop, head, early)
                raise HopRefused(status, head + early[:MAX_REFUSAL_BODY])
            # A client that left while the owner answered is seen by the relay at once.
            with contextlib.suppress(OSError):
                await send_all(client, head)
        except BaseException:
            close_socket(hop)
            raise
        forwarded = ForwardedClient(client, hop, early, owner=owner, reactor=self._reactor)
        return forwarded

    async def _answer_unless_gone(
        self, hop: socket.socket, request: bytes, owner: PeerOwner
    ) -> tuple[bytes, bytes]:
        """Send the upgrade and read the owner's answer; ``OwnerGone`` once it is judged dead.

        The answer's own failures (``OSError``, ``EOFError``, ``ValueError``) come out as they
        are, not wrapped in a group.
        """
        answer: list[tuple[bytes, bytes]] = []
        failure: list[Exception] = []
        gone = False
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                try:
                    await send_all(hop, request)
                    answer.append(await _read_response(hop))
                except (OSError, EOFError, ValueError) as exc:
                    failure.append(exc)
                nursery.cancel_scope.cancel()

            nursery.start_soon(ask)
            while self._owner_gone is not None and not gone:
                await trio.sleep(self._look_every)
                gone = self._owner_gone(owner)
            if gone:
                nursery.cancel_scope.cancel()
        if failure:
            raise failure[0]
        if gone or not answer:
            raise OwnerGone(f"{owner.pod} stopped answering and its heartbeat went silent")
        return answer[0]

    async def relay(self, forwarded: ForwardedClient) -> None:
        """Relay ``forwarded`` until it ends; a drain under way closes it at once."""
        self._clients.add(forwarded)
        metrics.FORWARDED_ACTIVE.inc()
        try:
            if self.draining:
                forwarded.stop(*FORWARDER_DRAINING)
            await forwarded.run()
        finally:
            self._clients.discard(forwarded)
            metrics.FORWARDED_ACTIVE.dec()

    async def drain(self, budget: float = 3 * CLOSE_TIMEOUT) -> None:
        """Close every forwarded client with 1001 (at a frame boundary), within ``budget``."""
        self.draining = True
        clients = list(self._clients)
        for forwarded in clients:
            forwarded.stop(*FORWARDER_DRAINING)
        with trio.move_on_after(budget):
            for forwarded in clients:
                await forwarded.finished.wait()
        log.info("forward.drained", clients=len(clients))


async def _read_response(hop: socket.socket) -> tuple[bytes, bytes]:
    received = b""
    while (end := head_end(received)) < 0:
        if len(received) > MAX_HEAD:
            raise ValueError("the owner's response head is too large")
        chunk = await recv(hop, RECEIVE_BUFFER)
        if not chunk:
            raise EOFError("the owner closed the connection before answering")
        received += chunk
    return received[:end], received[end:]


async def _read_body(hop: socket.socket, head: bytes, early: bytes) -> bytes:
    """The rest of a refusal's body (bounded), so the client gets the owner's sentence."""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = min(int(value.strip()), MAX_REFUSAL_BODY)
    more = b""
    try:
        while len(early) + len(more) < length:
            chunk = await recv(hop, length - len(early) - len(more))
            if not chunk:
                break
            more += chunk
    except OSError:
        pass
    return more


class _Direction:
    """One direction of the hop: its tracker and the bytes read but not yet written."""

    __slots__ = ("counter", "pending", "tracker")

    def __init__(self, name: str) -> None:
        self.tracker = FrameTracker()
        self.pending = memoryview(b"")
        self.counter = metrics.FORWARDED_BYTES.labels(direction=name)


class ForwardedClient:
    """One client relayed to its workspace's owner through this pod; see the module docstring."""

    def __init__(
        self,
        client: socket.socket,
        hop: socket.socket,
        early: bytes,
        *,
        owner: PeerOwner,
        reactor: Reactor,
    ) -> None:
        self.owner = owner
        self._reactor = reactor
        self._client = client
        self._hop = hop
        self._early = early
        self.started = True  # the owner's 101 reached the client
        self.finished = trio.Event()
        self._pumps = trio.CancelScope()
        self._to_client = _Direction("owner_to_client")
        self._to_owner = _Direction("client_to_owner")
        # The gateway's own close (code, reason), when it ends the connection itself.
        self._close: tuple[int, str] | None = None
        self._client_gone = False
        self._hop_gone = False

    def stop(self, code: int, reason: str) -> None:
        """Close the client (and the hop) with ``code`` at the next frame boundary."""
        if self._close is None:
            self._close = (code, reason)
        self._pumps.cancel()

    async def run(self) -> None:
        """Copy bytes both ways until one side ends, then close what is still open."""
        try:
            with self._pumps:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._owner_to_client)
                    nursery.start_soon(self._client_to_owner)
        finally:
            try:
                if self._close is None and not (self._ended_by_peers()):
                    # Cancelled from outside (the server shutting down).
                    self._close = FORWARDER_DRAINING
                await self._finish()
            finally:
                close_socket(self._hop)
                close_socket(self._client)
                self.finished.set()

    def _ended_by_peers(self) -> bool:
        return (
            self._client_gone
            or self._hop_gone
            or self._to_client.tracker.close_seen
            or self._to_owner.tracker.close_seen
        )

    # -- the two pumps ------------------------------------------------------------------------

    def _copy_ready(
        self, source: socket.socket, sink: socket.socket, direction: _Direction
    ) -> bool:
        """The fast path, run by the reactor when ``source`` is ready: one read, written on.

        Returns ``False`` (the pump takes over) at the end of ``source``'s stream or when
        ``sink`` did not take everything at once (the rest is left in ``direction.pending``,
        where a close after a cancellation finds it too).
        """
        try:
            data = source.recv(RECEIVE_BUFFER)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False  # end of stream: the pump reads it again and ends the hop
        self._account(direction, data)
        try:
            sent = sink.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # the pump's write fails again and says which side is gone
        if sent != len(data):
            direction.pending = memoryview(data)[sent:]
            return False
        return True

    def _account(self, direction: _Direction, data: bytes) -> None:
        """Follow ``direction``'s frames through ``data``; count it; note its close frame."""
        tracker = direction.tracker
        close_before = tracker.close_seen
        tracker.feed(data)
        if tracker.close_seen and not close_before:
            self._closing_started()
        direction.counter.inc(len(data))

    async def _owner_to_client(self) -> None:
        direction = self._to_client
        hop, client = self._hop, self._client
        wait = functools.partial(
            self._reactor.wait_readable,
            hop.fileno(),
            functools.partial(self._copy_ready, hop, client, direction),
        )
        data = self._early
        self._early = b""
        if data:
            self._account(direction, data)
        while True:
            if not data:
                await wait()
                data = bytes(direction.pending)  # what the fast path could not write at once
                if not data:
                    try:
                        data = hop.recv(RECEIVE_BUFFER)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        if not direction.tracker.close_seen:
                            # The hop died with the session's stream open: the client must
                            # know now.
                            self._hop_gone = True
                            metrics.HOP_FAILURES.labels(stage="mid_stream").inc()
                            log.warning("forward.hop_lost", owner=self.owner.pod)
                            self.stop(*HOP_LOST)
                        else:
                            self._pumps.cancel()
                        return
                    self._account(direction, data)
            # Only this task (and its fast path) writes the client until the pumps have ended
            # (then _finish does).
            if not await self._write(client, direction, data):
                self._client_gone = True
                self._pumps.cancel()
                return
            data = b""

    async def _client_to_owner(self) -> None:
        direction = self._to_owner
        hop, client = self._hop, self._client
        wait = functools.partial(
            self._reactor.wait_readable,
            client.fileno(),
            functools.partial(self._copy_ready, client, hop, direction),
        )
        while True:
            await wait()
            data = bytes(direction.pending)
            if not data:
                try:
                    data = client.recv(RECEIVE_BUFFER)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._client_gone = True
                    self._pumps.cancel()
                    return
                self._account(direction, data)
            if not await self._write(hop, direction, data):
                self._hop_gone = True
                metrics.HOP_FAILURES.labels(stage="mid_stream").inc()
                self.stop(*HOP_LOST)
                return

    @staticmethod
    async def _write(sock: socket.socket, direction: _Direction, data: bytes) -> bool:
        """Write ``data``, keeping what is not written yet in ``direction.pending`` (so a close
        after a cancellation can finish it first); returns False if ``sock`` failed."""
        view = memoryview(data)
        waited = False
        try:
            while view:
                try:
                    sent = sock.send(view)
                except BlockingIOError:
                    direction.pending = view
                    await wait_writable(sock)
                    waited = True
                    continue
                view = view[sent:]
        except OSError:
            direction.pending = memoryview(b"")
            return False
        direction.pending = memoryview(b"")
        if not waited:
            await checkpoint()
        return True

    def _closing_started(self) -> None:
        # A closing handshake under way must finish soon, whatever the peers do.
        deadline = trio.current_time() + CLOSE_TIMEOUT
        if deadline < self._pumps.deadline:
            self._pumps.deadline = deadline

    # -- the end -----------------------------------------------------------------------------

    async def _finish(self) -> None:
        """Send the close frames this pod owes (at frame boundaries), then let both sides go."""
        close = self._close
        if close is None:
            return  # ended end to end: a peer closed, nothing is owed
        code, reason = close
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                closed_client = await self._close_client(code, reason)
                closed_owner = await self._close_owner(code, reason)
                async with trio.open_nursery() as nursery:
                    if closed_client:
                        nursery.start_soon(self._drain_client)
                    if closed_owner:
                        nursery.start_soon(drain_to_eof, self._hop)
            except OSError as exc:
                log.debug("forward.close_error", error=repr(exc)[:200])
        log.info("forward.closed", code=code, reason=reason, owner=self.owner.pod)

    async def _close_client(self, code: int, reason: str) -> bool:
        direction = self._to_client
        if self._client_gone or direction.tracker.close_seen:
            return False
        if direction.pending:
            await send_all(self._client, direction.pending)
            direction.pending = memoryview(b"")
        tracker = direction.tracker
        # Finish the owner's frame in progress when the owner is still there to send it.
        while tracker.remaining and not self._hop_gone:
            chunk = await recv(self._hop, min(tracker.remaining, RECEIVE_BUFFER))
            if not chunk:
                break
            tracker.remaining -= len(chunk)
            await send_all(self._client, chunk)
        if not tracker.at_boundary:
            return False  # inside a frame that cannot be finished: only dropping TCP is left
        metrics.WS_CLOSES.labels(side="gateway", code=close_code_label(code)).inc()
        await send_all(self._client, frames.server_close(code, reason))
        return True

    async def _close_owner(self, code: int, reason: str) -> bool:
        direction = self._to_owner
        if self._hop_gone or direction.tracker.close_seen:
            return False
        if direction.pending:
            await send_all(self._hop, direction.pending)
            direction.pending = memoryview(b"")
        if not direction.tracker.at_boundary:
            return False
        await send_all(self._hop, frames.client_close(code, reason))
        return True

    async def _drain_client(self) -> None:
        """Read the client until its answering close frame (or EOF), dropping the rest."""
        tracker = FrameTracker(self._to_owner.tracker.remaining)
        try:
            while not tracker.close_seen:
                data = await recv(self._client, RECEIVE_BUFFER)
                if not data:
                    return
                tracker.feed(data)
        except OSError:
            pass


__all__ = [
    "FORWARDED_BY_HEADER",
    "GRANT_HEADER",
    "MAX_FORWARD_TRIES",
    "ForwardedClient",
    "Forwarder",
    "HopRefused",
    "HopUnreachable",
    "OwnerMoved",
    "hop_request",
]
