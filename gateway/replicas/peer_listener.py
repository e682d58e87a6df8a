"""The internal listener (``CXG_PEER_LISTEN_ADDR``): forwarded connects from peer pods.

::

    serve_peer_listener
    ├── accept loop (trio.serve_listeners)
    └── connections nursery
        └── per connection: read the request head (bounded in size and time), check it and
            its grant, attach to the session like a direct client, wait for the relay

It serves one thing: a WebSocket upgrade on a relay path carrying a valid grant
(``grants.py``) for a workspace this pod holds at the grant's epoch. Everything else gets a
plain HTTP answer and the connection is closed: 404 for any other request (none of the
health, metrics or admin routes are here), 400 for a broken upgrade, 401 for a missing or
refused grant, 409 when this pod does not hold the workspace at that epoch (the forwarder
reads the owner again; a forwarded connect is never forwarded on), and the session's own
refusals (429 at the client cap, 503).

A forwarded client is attached exactly as a direct one (``WebSocketEndpoint.attach_to_session``):
the same ``ClientRelay``, the same policy built for the session, the same client cap and
in-flight budget, counted on this pod. The grant is the trust: the client's token never
crosses the hop, and the network path between pods is not relied on (docs/security.md).
"""

from __future__ import annotations

import contextlib
import socket
from functools import partial

import structlog
import trio

from gateway import metrics
from gateway.config import ReplicaSettings, split_listen_addr
from gateway.replicas.forward import FORWARDED_BY_HEADER, GRANT_HEADER
from gateway.replicas.grants import GrantRefused, GrantVerifier, ReplayWindowFull
from gateway.replicas.placement import NotOwnedHere, OwnedElsewhere
from gateway.sessions.handshake import (
    MAX_HEAD,
    RequestHead,
    head_end,
    is_relay_upgrade,
    plain_response,
    upgrade_problem,
)
from gateway.sessions.manager import SessionManager
from gateway.sessions.outcome import SessionStartError
from gateway.sessions.relay import ClientRelay
from gateway.sessions.sockets import close_socket, send_all, take_socket
from gateway.web.server import WILDCARD_HOSTS, BindError, read_first_head
from gateway.web.websocket import Refused, WebSocketEndpoint, hold, refusal_for, refuse

log = structlog.get_logger(__name__)

GRANT_REFUSED = "peer grant refused"
NOT_OWNED = "this pod does not own the workspace at that epoch"
NOT_FOUND = "the internal listener serves forwarded WebSocket upgrades only"
# How long the connections still running may take to close after the listener is told to stop
# (their sessions have closed them during the drain already).
SHUTDOWN_GRACE = 3.0


class PeerListener:
    """Checks forwarded connects and attaches them to this pod's sessions."""

    def __init__(
        self,
        replicas: ReplicaSettings,
        manager: SessionManager,
        endpoint: WebSocketEndpoint,
        *,
        verifier: GrantVerifier | None = None,
    ) -> None:
        self._manager = manager
        self._endpoint = endpoint
        self._verifier = verifier or GrantVerifier(replicas.peer_secret.reveal(), replicas.pod_name)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection from a peer; its errors end it and nothing else."""
        try:
            await self._serve(stream)
        except* Exception as group:
            errors = [type(error).__name__ for error in group.exceptions]
            log.warning("peer.connection_error", errors=errors, detail=str(group)[:200])
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        client = take_socket(stream)
        relay: ClientRelay | None = None
        try:
            try:
                received, request = await read_first_head(client)
            except trio.TooSlowError:
                await _answer(client, 408, "the request head did not arrive in time", "slow_head")
                return
            except ValueError:
                await _answer(
                    client, 431, f"the request head is larger than {MAX_HEAD} bytes", "big"
                )
                return
            if request is None or not is_relay_upgrade(request):
                await _answer(client, 404, NOT_FOUND, "not_an_upgrade")
                return
            rest = received[head_end(received) :]
            try:
                relay = await self._attach(client, request, rest)
            except Refused as refused:
                await refuse(client, refused)
                return
            await hold(relay)
        finally:
            if relay is None or not relay.started:
                close_socket(client)

    async def _attach(
        self, client: socket.socket, request: RequestHead, rest: bytes
    ) -> ClientRelay:
        problem = upgrade_problem(request)
        if problem is not None or rest:
            metrics.PEER_CONNECTS.labels(result="bad_upgrade").inc()
            raise Refused(400, problem or "data before the upgrade was answered")
        grants = [value for name, value in request.headers if name == GRANT_HEADER]
        if len(grants) != 1:
            metrics.PEER_CONNECTS.labels(result="grant_refused").inc()
            log.warning("peer.grant_refused", reason="no grant, or more than one")
            raise Refused(401, GRANT_REFUSED)
        try:
            grant = self._verifier.verify(grants[0])
        except ReplayWindowFull as exc:
            metrics.PEER_CONNECTS.labels(result="replay_window_full").inc()
            log.warning("peer.grant_refused", reason=str(exc))
            raise Refused(503, "this pod is receiving too many forwarded connects", 1) from None
        except GrantRefused as exc:
            metrics.PEER_CONNECTS.labels(result="grant_refused").inc()
            log.warning(
                "peer.grant_refused",
                reason=str(exc),
                forwarded_by=(request.header(FORWARDED_BY_HEADER) or "")[:64],
            )
            raise Refused(401, GRANT_REFUSED) from None
        structlog.contextvars.bind_contextvars(workspace_id=grant.workspace_id)
        try:
            session = await self._manager.attach(grant.workspace_id, epoch=grant.epoch)
            relay = await self._endpoint.attach_to_session(client, request, session)
        except (NotOwnedHere, OwnedElsewhere):
            # OwnedElsewhere: the workspace moved between the check of the epoch and the start.
            # Either way the forwarder reads the owner again; a forwarded connect is never
            # forwarded a second time.
            metrics.PEER_CONNECTS.labels(result="not_owned").inc()
            log.info("peer.not_owned", epoch=grant.epoch)
            raise Refused(409, NOT_OWNED) from None
        except (SessionStartError, ConnectionError) as exc:
            metrics.PEER_CONNECTS.labels(result="refused").inc()
            raise refusal_for(exc, grant.workspace_id) from None
        metrics.PEER_CONNECTS.labels(result="attached").inc()
        log.info("client.attached", clients=session.client_count, forwarded=True)
        return relay


async def _answer(client: socket.socket, status: int, message: str, result: str) -> None:
    """Answer ``status`` (within a second); the caller closes the connection."""
    metrics.PEER_CONNECTS.labels(result=result).inc()
    with trio.move_on_after(1):
        with contextlib.suppress(OSError):
            await send_all(client, plain_response(status, message))


async def serve_peer_listener(
    listener: PeerListener,
    listen_addr: str,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve forwarded connects on ``listen_addr`` until ``shutdown``; reports the bound
    ``HOST:PORT`` addresses. A failure to bind is a ``BindError`` of one sentence."""
    host, port = split_listen_addr(listen_addr)
    try:
        # A wildcard means every interface of both families, as for the main listener.
        listeners = await trio.open_tcp_listeners(
            port, host=None if host in WILDCARD_HOSTS else host
        )
    except OSError as error:
        raise BindError(
            f"cannot listen on {listen_addr} (CXG_PEER_LISTEN_ADDR): {error.strerror or error}"
        ) from None
    bound = [_address(each.socket.getsockname()) for each in listeners]
    async with trio.open_nursery() as connections:
        try:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    partial(trio.serve_listeners, handler_nursery=connections),
                    listener.handle,
                    listeners,
                )
                log.info("peer.listening", addresses=bound)
                task_status.started(bound)
                await shutdown.wait()
                accepting.cancel_scope.cancel()
        finally:
            for each in listeners:
                await trio.aclose_forcefully(each)
            connections.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE


def _address(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
