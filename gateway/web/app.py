"""The ASGI application: the WebSocket relay endpoint, health, metrics and admin routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway.preflight import PreflightState
from gateway.web.admin import AdminRoutes

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# A WebSocket reaches the ASGI app only when it is not the first request of a fresh HTTP/1.1
# connection (after an earlier request on a kept-alive connection, or over HTTP/2): the relay
# is the front door's tunnel alone, so these are refused.
NOT_A_FRESH_CONNECTION = (
    "open the WebSocket as the first request of a new HTTP/1.1 connection; "
    "upgrades on a reused connection or over HTTP/2 are not relayed"
)


@attrs.define
class Readiness:
    """Whether the daemon takes new clients (``/readyz``)."""

    serving: bool = False
    draining: bool = False
    preflight: PreflightState = attrs.Factory(lambda: PreflightState(passed=True))

    @property
    def ready(self) -> bool:
        """Serving, start-up checks passed, and not draining."""
        return self.serving and self.preflight.passed and not self.draining

    def reason(self) -> str:
        """Why it is not ready, in words fit for anyone (details are in the log)."""
        if self.draining:
            return "draining"
        if not self.preflight.passed and self.preflight.failure is not None:
            return "start-up checks failing (see the gateway's log)"
        return "starting"


def build_app(admin: AdminRoutes, readiness: Readiness, *, metrics: bool) -> Any:
    """The gateway's ASGI app: WebSockets at ``/`` and ``/codex-app/ws``, everything else HTTP."""

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_: Request) -> Response:
        if readiness.ready:
            return PlainTextResponse("ready\n")
        return PlainTextResponse(readiness.reason() + "\n", status_code=503)

    async def upgrade_required(_: Request) -> Response:
        return PlainTextResponse(
            "WebSocket upgrade required\n", status_code=426, headers={"upgrade": "websocket"}
        )

    routes: list[Any] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/admin/sessions", admin.list_sessions, methods=["GET"]),
        Route("/admin/sessions/restart", admin.restart_session, methods=["POST"]),
        Route("/", upgrade_required, methods=["GET"]),
        Route("/codex-app/ws", upgrade_required, methods=["GET"]),
    ]
    http_app = Starlette(routes=routes)
    exporter = make_asgi_app() if metrics else None
    served = {(route.path, method) for route in routes for method in route.methods or ()}
    if metrics:
        served.add(("/metrics", "GET"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await receive()
            body = (NOT_A_FRESH_CONNECTION + "\n").encode()
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
            await send({"type": "websocket.http.response.start", "status": 400, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
            return
        if exporter is not None and scope["type"] == "http" and scope["path"] == "/metrics":
            await exporter(scope, receive, send)
            return
        await http_app(scope, receive, send)  # type: ignore[arg-type]

    app.served_routes = frozenset(served - {(path, "HEAD") for path, _ in served})  # type: ignore[attr-defined]
    return app


def build_metrics_app() -> Any:
    """A separate metrics app for ``CXG_METRICS_LISTEN_ADDR`` (answers ``/metrics``)."""
    return make_asgi_app()
