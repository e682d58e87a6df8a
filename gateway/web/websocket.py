"""The client WebSocket endpoint (``/`` and ``/codex-app/ws``), as a raw ASGI handler.

Raw ASGI rather than a framework wrapper: this is the relay's hot path, and every frame passes
through the ``receive``/``send`` callables handed straight to the relay. Rejections before the
upgrade are plain HTTP responses (the ASGI ``websocket.http.response`` extension): 401 for a
missing or bad token, 503 when the verifier, the store or the child is unavailable or the
gateway is draining or full, 403 for a browser ``Origin``.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from gateway import metrics
from gateway.auth.authenticators import Authenticator, Unauthorized, VerifierUnavailable
from gateway.auth.tokens import extract_bearer
from gateway.sessions.manager import SessionManager, Unavailable
from gateway.sessions.session import SessionStartError
from gateway.store.base import archive_key

log = structlog.get_logger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

WEBSOCKET_PATHS = frozenset({"/", "/codex-app/ws"})


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header, decoded as latin-1 like HTTP/1.1 does."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


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


async def deny(
    send: Send,
    status: int,
    message: str,
    retry_after: float | None = None,
    request_id: str | None = None,
) -> None:
    """Refuse the upgrade with a plain-text HTTP response (server errors carry a request id)."""
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    if retry_after is not None:
        headers.append((b"retry-after", str(int(retry_after)).encode()))
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
        message = f"{message} (request id {request_id})"
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": (message + "\n").encode()})


class WebSocketEndpoint:
    """Authenticate, find or start the workspace's session, relay until the client leaves."""

    def __init__(
        self,
        manager: SessionManager,
        authenticator: Authenticator,
        allowed_origins: tuple[str, ...],
    ) -> None:
        self._manager = manager
        self._authenticator = authenticator
        self._allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        origin = header(scope, b"origin")
        if origin is not None and not any(
            hmac.compare_digest(origin, allowed) for allowed in self._allowed_origins
        ):
            metrics.AUTH_RESULTS.labels(result="origin_refused").inc()
            await deny(send, 403, "origin not allowed")
            return
        token = extract_bearer(header(scope, b"authorization"))
        if token is None:
            metrics.AUTH_RESULTS.labels(result="missing").inc()
            await deny(send, 401, "missing Bearer")
            return
        try:
            identity = await self._authenticator.verify(token)
        except Unauthorized:
            metrics.AUTH_RESULTS.labels(result="unauthorized").inc()
            await deny(send, 401, "unauthorized")
            return
        except VerifierUnavailable as exc:
            metrics.AUTH_RESULTS.labels(result="verifier_unavailable").inc()
            request_id = new_request_id()
            log.warning(
                "auth.verifier_unavailable",
                error=str(exc),
                verifier_url=exc.url,
                request_id=request_id,
            )
            await deny(send, 503, VERIFIER_DOWN, retry_after=5, request_id=request_id)
            return
        metrics.AUTH_RESULTS.labels(result="ok").inc()
        structlog.contextvars.bind_contextvars(workspace_id=identity.workspace_id)
        try:
            session = await self._manager.attach(identity.workspace_id)
            relay = await session.attach_client(receive, send)
        except Unavailable as exc:
            # Our own sentences (draining, full, crash back-off): nothing internal in them.
            request_id = new_request_id()
            log.warning("connect.unavailable", reason=str(exc), request_id=request_id)
            await deny(send, 503, str(exc), retry_after=exc.retry_after, request_id=request_id)
            return
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
            await deny(send, exc.status, message, request_id=request_id)
            return
        except ConnectionError as exc:
            request_id = new_request_id()
            log.warning("relay.child_connect_failed", error=str(exc), request_id=request_id)
            await deny(send, 503, CHILD_UNREACHABLE, retry_after=1, request_id=request_id)
            return
        log.info("client.attached", clients=session.client_count)
        try:
            await relay.finished.wait()
        finally:
            # If Hypercorn cancels this handler, the relay must not outlive its client.
            relay.cancel_scope.cancel()
