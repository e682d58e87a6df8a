"""The client WebSocket endpoint (``/`` and ``/codex-app/ws``), as a raw ASGI handler.

Raw ASGI rather than a framework wrapper: this is the relay's hot path, and every frame passes
through the ``receive``/``send`` callables handed straight to the relay. Rejections before the
upgrade are plain HTTP responses (the ASGI ``websocket.http.response`` extension): 401 for a
missing or bad token, 503 when the verifier, the store or the child is unavailable or the
gateway is draining or full, 403 for a browser ``Origin``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from gateway import metrics
from gateway.auth.authenticators import Authenticator, Unauthorized, VerifierUnavailable
from gateway.auth.tokens import extract_bearer
from gateway.sessions.manager import SessionManager, Unavailable
from gateway.sessions.outcome import SessionStartError

log = structlog.get_logger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

WEBSOCKET_PATHS = frozenset({"/", "/codex-app/ws"})


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header, decoded as latin-1 like HTTP/1.1 does."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            decoded: str = value.decode("latin-1")
            return decoded
    return None


async def deny(send: Send, status: int, message: str, retry_after: float | None = None) -> None:
    """Refuse the upgrade with a plain-text HTTP response."""
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    if retry_after is not None:
        headers.append((b"retry-after", str(int(retry_after)).encode()))
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
            log.warning("auth.verifier_unavailable", error=str(exc))
            await deny(send, 503, "token verifier unavailable; retry shortly", retry_after=5)
            return
        metrics.AUTH_RESULTS.labels(result="ok").inc()
        structlog.contextvars.bind_contextvars(workspace_id=identity.workspace_id)
        try:
            session = await self._manager.attach(identity.workspace_id)
            relay = await session.attach_client(receive, send)
        except Unavailable as exc:
            await deny(send, 503, str(exc), retry_after=exc.retry_after)
            return
        except SessionStartError as exc:
            await deny(send, exc.status, str(exc))
            return
        except ConnectionError as exc:
            log.warning("relay.child_connect_failed", error=str(exc))
            await deny(send, 503, "session unavailable; retry shortly", retry_after=1)
            return
        try:
            await relay.finished.wait()
        finally:
            # If Hypercorn cancels this handler, the relay must not outlive its client.
            relay.cancel_scope.cancel()
