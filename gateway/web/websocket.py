"""The client WebSocket endpoint (``/`` and ``/codex-app/ws``): the checks, then the tunnel.

The front door hands over every connection whose first request is a WebSocket upgrade on one
of these paths. Before anything reaches a child the gateway checks, in order: the handshake
itself (400, 426), the browser ``Origin`` (403), the bearer token (401; 503 when the verifier
is unreachable), the workspace's session (503 while draining, full or backing off) and the
workspace's client cap (429). Each refusal is a plain HTTP response and the connection is
closed. Then the session starts a ``ClientRelay`` in its own nursery; this handler waits for it
and, if it is itself cancelled, stops the relay and waits until the relay has sent its close.

In replica mode a workspace owned by another pod ends the session's start with
``OwnedElsewhere``: the already-verified connect is then forwarded to the owner
(``gateway/replicas/forward.py``) and relayed from this handler's task. An owner that answers
409 (it no longer holds the workspace at that epoch) makes the handler ask the session manager
again, which re-reads the ownership record: at most ``MAX_FORWARD_TRIES`` times, then 503.
"""

from __future__ import annotations

import hmac
import secrets
import socket
import weakref
from collections.abc import Callable

import structlog
import trio

from gateway import metrics
from gateway.auth.authenticators import (
    Authenticator,
    Identity,
    Unauthorized,
    VerifierUnavailable,
)
from gateway.auth.tokens import extract_bearer
from gateway.config import Config
from gateway.policy import ClientPolicy
from gateway.replicas.forward import (
    MAX_FORWARD_TRIES,
    ForwardedClient,
    Forwarder,
    HopRefused,
    HopUnreachable,
    OwnerGone,
    OwnerMoved,
)
from gateway.replicas.placement import OwnedElsewhere
from gateway.sessions.budget import InflightBudget
from gateway.sessions.handshake import RequestHead, plain_response, upgrade_problem
from gateway.sessions.manager import SessionManager, Unavailable
from gateway.sessions.outcome import SessionStartError
from gateway.sessions.reactor import Reactor
from gateway.sessions.relay import CLOSE_TIMEOUT, ClientRelay
from gateway.sessions.session import Session
from gateway.sessions.sockets import close_socket, drain_to_eof, send_all
from gateway.store.base import archive_key

log = structlog.get_logger(__name__)

# Counted on every connect: looked up by label once.
_AUTH_OK = metrics.AUTH_RESULTS.labels(result="ok")

# A refusal is sent, then the client has this long to read it and hang up.
REFUSAL_LINGER = 1.0

# Builds a client's access policy from the session it attaches to (tests and the bench may
# give their own).
PolicyFactory = Callable[[Session], ClientPolicy]


# What a client is told when its connect fails on our side. Fixed sentences: the detail (an
# agentserver URL, an S3 endpoint and bucket, an exception's text) goes to the log only, under
# the request id the client also gets.
START_FAILED = "session could not start; retry shortly"
RESTORE_REFUSED = (
    "the saved state of this workspace ({key}) cannot be restored; it is left untouched in the "
    "store for an operator to look at"
)
CHILD_UNREACHABLE = "session unavailable; retry shortly"
VERIFIER_DOWN = "token verifier unavailable; retry shortly"
OWNER_MOVING = "the pod serving this workspace is changing; retry shortly"
OWNER_UNREACHABLE = "the pod serving this workspace cannot be reached; retry shortly"


def new_request_id() -> str:
    """A short random id that ties a refused connect to its log line."""
    return secrets.token_hex(8)


class Refused(Exception):
    """The connect is refused with ``status`` and a one-sentence ``message``.

    Refusals for failures on the gateway's side carry a ``request_id``, sent to the client in
    the body and as ``X-Request-Id``, and logged once with the detail.
    """

    def __init__(
        self,
        status: int,
        message: str,
        retry_after: float | None = None,
        request_id: str | None = None,
        response: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.request_id = request_id
        # A complete response to send as it is (the owning pod's own refusal, forwarded).
        self.response = response


class WebSocketEndpoint:
    """Check a relay upgrade, attach it to its workspace's session, wait until it ends."""

    def __init__(
        self,
        manager: SessionManager,
        authenticator: Authenticator,
        config: Config,
        *,
        budget: InflightBudget,
        reactor: Reactor,
        policy_for: PolicyFactory | None = None,
        forwarder: Forwarder | None = None,
    ) -> None:
        self._manager = manager
        self._authenticator = authenticator
        self._config = config
        self._budget = budget
        self._reactor = reactor
        self._policy_for = policy_for or self._session_policy
        self._forwarder = forwarder
        # A session's policy is pure and the same for each of its clients: built once.
        self._policies: weakref.WeakKeyDictionary[Session, ClientPolicy] = (
            weakref.WeakKeyDictionary()
        )

    def _session_policy(self, session: Session) -> ClientPolicy:
        """The operator's policy, bounded to ``session``'s own home and CODEX_HOME."""
        policy = self._policies.get(session)
        if policy is None:
            directories = session.directories
            policy = self._policies[session] = ClientPolicy.for_session(
                self._config, home=str(directories.home), codex_home=str(directories.codex_home)
            )
        return policy

    async def serve(self, client: socket.socket, request: RequestHead, rest: bytes) -> None:
        """Serve one connection whose first request is ``request`` (``rest``: bytes after it).

        ``client`` is this handler's to close, until its relay has started and owns it.
        """
        relay: ClientRelay | ForwardedClient | None = None
        try:
            try:
                relay = await self._attach(client, request, rest)
            except Refused as refused:
                await refuse(client, refused)
                return
            if isinstance(relay, ForwardedClient):
                assert self._forwarder is not None
                await self._forwarder.relay(relay)
            else:
                await hold(relay)
        finally:
            if relay is None or not relay.started:
                close_socket(client)

    async def attach_to_session(
        self, client: socket.socket, request: RequestHead, session: Session
    ) -> ClientRelay:
        """Start ``client``'s relay in ``session`` (a direct or a forwarded client alike)."""
        config = self._config
        relay = ClientRelay(
            client,
            request,
            on_activity=session.touch,
            max_message_size=config.ws_max_message_size,
            ping_interval=config.ws_ping_interval,
            budget=self._budget,
            policy=self._policy_for(session),
            reactor=self._reactor,
        )
        await session.attach_client(relay)
        return relay

    async def _attach(
        self, client: socket.socket, request: RequestHead, rest: bytes
    ) -> ClientRelay | ForwardedClient:
        problem = upgrade_problem(request)
        if problem is not None:
            version_problem = problem.startswith("Sec-WebSocket-Version")
            raise Refused(426 if version_problem else 400, problem)
        if rest:
            raise Refused(400, "the client sent data before the WebSocket upgrade was answered")
        origin = request.header("origin")
        if origin is not None and not any(
            hmac.compare_digest(origin, allowed) for allowed in self._config.allowed_origins
        ):
            metrics.AUTH_RESULTS.labels(result="origin_refused").inc()
            raise Refused(403, "origin not allowed")
        token = extract_bearer(request.header("authorization"))
        if token is None:
            metrics.AUTH_RESULTS.labels(result="missing").inc()
            raise Refused(401, "missing Bearer")
        try:
            identity = await self._authenticator.verify(token)
        except Unauthorized:
            metrics.AUTH_RESULTS.labels(result="unauthorized").inc()
            raise Refused(401, "unauthorized") from None
        except VerifierUnavailable as exc:
            metrics.AUTH_RESULTS.labels(result="verifier_unavailable").inc()
            request_id = new_request_id()
            log.warning(
                "auth.verifier_unavailable",
                error=str(exc),
                verifier_url=exc.url,
                request_id=request_id,
            )
            raise Refused(503, VERIFIER_DOWN, 5, request_id) from None
        _AUTH_OK.inc()
        structlog.contextvars.bind_contextvars(workspace_id=identity.workspace_id)
        tries = 0
        while True:
            try:
                session = await self._manager.attach(identity.workspace_id)
                relay = await self.attach_to_session(client, request, session)
            except OwnedElsewhere as elsewhere:
                tries += 1
                forwarded = await self._forward(client, request, identity, elsewhere, tries)
                if forwarded is not None:
                    return forwarded
                continue
            except (SessionStartError, ConnectionError) as exc:
                raise refusal_for(exc, identity.workspace_id) from None
            log.info("client.attached", clients=session.client_count)
            return relay

    async def _forward(
        self,
        client: socket.socket,
        request: RequestHead,
        identity: Identity,
        elsewhere: OwnedElsewhere,
        tries: int,
    ) -> ForwardedClient | None:
        """Open the hop to the owner; ``None`` when the owner moved and another try is left."""
        owner = elsewhere.owner
        if self._forwarder is None:
            # Only a placement of replica mode says OwnedElsewhere, and replica mode forwards.
            raise Refused(503, START_FAILED, request_id=new_request_id())
        try:
            forwarded = await self._forwarder.open(
                client,
                request,
                workspace_id=identity.workspace_id,
                user_id=identity.user_id,
                owner=owner,
            )
        except OwnerMoved:
            log.info("forward.owner_moved", pod=owner.pod, epoch=owner.epoch, tries=tries)
            if tries < MAX_FORWARD_TRIES:
                metrics.FORWARDS.labels(result="owner_moved").inc()
                return None
            metrics.FORWARDS.labels(result="gave_up").inc()
            request_id = new_request_id()
            log.warning("forward.gave_up", tries=tries, request_id=request_id)
            raise Refused(503, OWNER_MOVING, 1, request_id) from None
        except OwnerGone as exc:
            # Judged dead while it kept us waiting: the next attach claims the workspace.
            log.info("forward.owner_gone", pod=owner.pod, error=str(exc), tries=tries)
            if tries < MAX_FORWARD_TRIES:
                metrics.FORWARDS.labels(result="owner_gone").inc()
                return None
            metrics.FORWARDS.labels(result="unreachable").inc()
            raise Refused(503, OWNER_UNREACHABLE, 1, new_request_id()) from None
        except HopUnreachable as exc:
            metrics.FORWARDS.labels(result="unreachable").inc()
            request_id = new_request_id()
            log.warning("forward.unreachable", pod=owner.pod, error=str(exc), request_id=request_id)
            raise Refused(503, OWNER_UNREACHABLE, 1, request_id) from None
        except HopRefused as exc:
            metrics.FORWARDS.labels(result="refused").inc()
            if exc.status in (400, 401, 404):
                # The owner refused the grant or the hop itself: this side's fault (most often
                # CXG_PEER_SECRET differing between pods), never the client's.
                request_id = new_request_id()
                log.error(
                    "forward.hop_refused",
                    pod=owner.pod,
                    status=exc.status,
                    hint="check that CXG_PEER_SECRET is the same on every replica",
                    request_id=request_id,
                )
                raise Refused(503, OWNER_UNREACHABLE, 1, request_id) from None
            log.info("forward.refused_by_owner", pod=owner.pod, status=exc.status)
            raise Refused(exc.status, "", response=exc.response) from None
        metrics.FORWARDS.labels(result="relayed").inc()
        log.info("client.forwarded", pod=owner.pod, epoch=owner.epoch)
        return forwarded


def refusal_for(exc: SessionStartError | ConnectionError, workspace_id: str) -> Refused:
    """The refusal a connect gets when its session cannot take it (fixed sentences; the detail
    goes to the log under the request id the client also gets)."""
    request_id = new_request_id()
    if isinstance(exc, Unavailable):
        # Our own sentences (draining, full, crash back-off): nothing internal in them.
        log.warning("connect.unavailable", reason=str(exc), request_id=request_id)
        return Refused(503, str(exc), exc.retry_after, request_id)
    if isinstance(exc, SessionStartError):
        log.warning(
            "connect.session_start_failed",
            status=exc.status,
            error=str(exc),
            request_id=request_id,
        )
        message = (
            RESTORE_REFUSED.format(key=archive_key(workspace_id))
            if exc.status == 500
            else START_FAILED
        )
        return Refused(exc.status, message, request_id=request_id)
    log.warning("relay.child_connect_failed", error=str(exc), request_id=request_id)
    return Refused(503, CHILD_UNREACHABLE, 1, request_id)


async def hold(relay: ClientRelay) -> None:
    """Wait until ``relay`` ends; if cancelled (server shutdown), stop it and let it close."""
    try:
        await relay.finished.wait()
    finally:
        if not relay.finished.is_set():
            # Cancelled (server shutdown): stop the relay, let it send its close first.
            relay.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(3 * CLOSE_TIMEOUT):
                await relay.finished.wait()


async def refuse(client: socket.socket, refused: Refused) -> None:
    """Answer with the refusal, then close once the client has read it (bounded)."""
    response = refused.response
    if response is None:
        message = str(refused)
        if refused.request_id is not None:
            message = f"{message} (request id {refused.request_id})"
        response = plain_response(
            refused.status,
            message,
            retry_after=refused.retry_after,
            request_id=refused.request_id,
        )
    with trio.move_on_after(REFUSAL_LINGER):
        try:
            await send_all(client, response)
            client.shutdown(socket.SHUT_WR)
            await drain_to_eof(client)
        except OSError:
            pass
