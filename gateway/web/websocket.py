"""The client WebSocket endpoint (``/`` and ``/codex-app/ws``): the checks, then the tunnel.

The front door hands over every connection whose first request is a WebSocket upgrade on one
of these paths. Before anything reaches a child the gateway checks, in order: the handshake
itself (400, 426), the browser ``Origin`` (403), the bearer token (401; 503 when the verifier
is unreachable), the workspace's session (503 while draining, full or backing off) and the
workspace's client cap (429). Each refusal is a plain HTTP response and the connection is
closed. Then the session starts a ``ClientRelay`` in its own nursery; this handler waits for it
and, if it is itself cancelled, stops the relay and waits until the relay has sent its close.
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
from gateway.auth.authenticators import Authenticator, Unauthorized, VerifierUnavailable
from gateway.auth.tokens import extract_bearer
from gateway.config import Config
from gateway.policy import ClientPolicy
from gateway.sessions.budget import InflightBudget
from gateway.sessions.handshake import RequestHead, plain_response, upgrade_problem
from gateway.sessions.manager import SessionManager, Unavailable
from gateway.sessions.outcome import SessionStartError
from gateway.sessions.relay import CLOSE_TIMEOUT, ClientRelay
from gateway.sessions.session import Session
from gateway.sessions.sockets import close_socket, drain_to_eof, send_all, take_socket
from gateway.store.base import archive_key

log = structlog.get_logger(__name__)

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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.request_id = request_id


class WebSocketEndpoint:
    """Check a relay upgrade, attach it to its workspace's session, wait until it ends."""

    def __init__(
        self,
        manager: SessionManager,
        authenticator: Authenticator,
        config: Config,
        *,
        budget: InflightBudget,
        policy_for: PolicyFactory | None = None,
    ) -> None:
        self._manager = manager
        self._authenticator = authenticator
        self._config = config
        self._budget = budget
        self._policy_for = policy_for or self._session_policy
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

    async def serve(self, stream: trio.SocketStream, request: RequestHead, rest: bytes) -> None:
        """Serve one connection whose first request is ``request`` (``rest``: bytes after it)."""
        client = take_socket(stream)
        relay: ClientRelay | None = None
        try:
            try:
                relay = await self._attach(client, request, rest)
            except Refused as refused:
                await _refuse(client, refused)
                return
            try:
                await relay.finished.wait()
            finally:
                if not relay.finished.is_set():
                    # Cancelled (server shutdown): stop the relay, let it send its close first.
                    relay.cancel_scope.cancel()
                    with trio.CancelScope(shield=True), trio.move_on_after(3 * CLOSE_TIMEOUT):
                        await relay.finished.wait()
        finally:
            if relay is None or not relay.started:
                close_socket(client)

    async def _attach(
        self, client: socket.socket, request: RequestHead, rest: bytes
    ) -> ClientRelay:
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
        metrics.AUTH_RESULTS.labels(result="ok").inc()
        structlog.contextvars.bind_contextvars(workspace_id=identity.workspace_id)
        config = self._config
        try:
            session = await self._manager.attach(identity.workspace_id)
            relay = ClientRelay(
                client,
                request,
                on_activity=session.touch,
                max_message_size=config.ws_max_message_size,
                ping_interval=config.ws_ping_interval,
                budget=self._budget,
                policy=self._policy_for(session),
            )
            await session.attach_client(relay)
        except Unavailable as exc:
            # Our own sentences (draining, full, crash back-off): nothing internal in them.
            request_id = new_request_id()
            log.warning("connect.unavailable", reason=str(exc), request_id=request_id)
            raise Refused(503, str(exc), exc.retry_after, request_id) from None
        except SessionStartError as exc:
            request_id = new_request_id()
            log.warning(
                "connect.session_start_failed",
                status=exc.status,
                error=str(exc),
                request_id=request_id,
            )
            message = (
                RESTORE_REFUSED.format(key=archive_key(identity.workspace_id))
                if exc.status == 500
                else START_FAILED
            )
            raise Refused(exc.status, message, request_id=request_id) from None
        except ConnectionError as exc:
            request_id = new_request_id()
            log.warning("relay.child_connect_failed", error=str(exc), request_id=request_id)
            raise Refused(503, CHILD_UNREACHABLE, 1, request_id) from None
        log.info("client.attached", clients=session.client_count)
        return relay


async def _refuse(client: socket.socket, refused: Refused) -> None:
    """Answer with the refusal, then close once the client has read it (bounded)."""
    message = str(refused)
    if refused.request_id is not None:
        message = f"{message} (request id {refused.request_id})"
    response = plain_response(
        refused.status, message, retry_after=refused.retry_after, request_id=refused.request_id
    )
    with trio.move_on_after(REFUSAL_LINGER):
        try:
            await send_all(client, response)
            client.shutdown(socket.SHUT_WR)
            await drain_to_eof(client)
        except OSError:
            pass
