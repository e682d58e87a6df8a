"""Admin routes: list sessions (admin secret) and restart one (admin secret or that workspace).

Unlike the Go service, a workspace token may restart only its own workspace.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from gateway.auth.authenticators import Authenticator, Unauthorized, VerifierUnavailable
from gateway.auth.tokens import extract_bearer, is_safe_workspace_id
from gateway.config import Secret
from gateway.replicas.placement import Placement, SolePlacement
from gateway.sessions.manager import SessionManager
from gateway.sessions.outcome import Fenced, Saved, Superseded

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 4096


class AdminRoutes:
    """Handlers for ``/admin/*``."""

    def __init__(
        self,
        manager: SessionManager,
        authenticator: Authenticator,
        admin_secret: Secret | None,
        *,
        versions: Callable[[], dict[str, str | None]] = dict,
        placement: Placement | None = None,
    ) -> None:
        self._manager = manager
        self._authenticator = authenticator
        self._admin_secret = admin_secret
        self._versions = versions
        self._placement = placement or SolePlacement()

    def _is_admin(self, token: str) -> bool:
        if not self._admin_secret:
            return False
        return hmac.compare_digest(token.encode(), self._admin_secret.reveal().encode())

    async def list_sessions(self, request: Request) -> Response:
        """``GET /admin/sessions``: every session with its state (admin secret only)."""
        token = extract_bearer(request.headers.get("authorization"))
        if token is None:
            return PlainTextResponse("missing Bearer\n", status_code=401)
        if not self._admin_secret:
            return PlainTextResponse(
                "admin listing disabled: set CXG_ADMIN_SECRET\n", status_code=403
            )
        if not self._is_admin(token):
            return PlainTextResponse("unauthorized\n", status_code=401)
        # "version" is beside "sessions", so existing readers of the listing keep working.
        sessions = self._manager.describe()
        listing: dict[str, object] = {"sessions": sessions, "version": self._versions()}
        # Replica mode: this pod's name on each of its sessions, and every workspace's owner.
        replica = await self._placement.describe_owners()
        if replica:
            for session in sessions:
                session["ownerPod"] = replica["pod"]
            listing["replica"] = replica
        return JSONResponse(listing)

    async def restart_session(self, request: Request) -> Response:
        """``POST /admin/sessions/restart`` ``{"workspaceId"}``: stop and save; 204."""
        token = extract_bearer(request.headers.get("authorization"))
        if token is None:
            return PlainTextResponse("missing Bearer\n", status_code=401)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return PlainTextResponse("bad body\n", status_code=400)
        try:
            payload = json.loads(body)
            workspace_id = payload.get("workspaceId", "")
        except (ValueError, AttributeError):
            return PlainTextResponse("bad body\n", status_code=400)
        if not isinstance(workspace_id, str) or not workspace_id:
            return PlainTextResponse("workspaceId required\n", status_code=400)
        if not is_safe_workspace_id(workspace_id):
            return PlainTextResponse("workspaceId not valid\n", status_code=400)
        if not self._is_admin(token):
            try:
                identity = await self._authenticator.verify(token)
            except Unauthorized:
                return PlainTextResponse("unauthorized\n", status_code=401)
            except VerifierUnavailable:
                return PlainTextResponse("token verifier unavailable\n", status_code=503)
            if identity.workspace_id != workspace_id:
                return PlainTextResponse(
                    "forbidden: a workspace token may restart only its own workspace\n",
                    status_code=403,
                )
        log.info("admin.restart", workspace_id=workspace_id)
        saved = await self._manager.restart(workspace_id)
        if not isinstance(saved, Saved):
            if isinstance(saved, Superseded):
                return PlainTextResponse(
                    "session stopped but not saved: a newer snapshot of this workspace exists "
                    "elsewhere; its CODEX_HOME is set aside under CXG_TMP_ROOT/.orphaned\n",
                    status_code=409,
                )
            if isinstance(saved, Fenced):
                return PlainTextResponse(
                    "session stopped unsaved: this pod lost contact with the store (fenced); "
                    "its CODEX_HOME is set aside under CXG_TMP_ROOT/.orphaned\n",
                    status_code=503,
                )
            return PlainTextResponse(
                "session stopped but its CODEX_HOME is not saved yet; it is kept and retried\n",
                status_code=500,
            )
        return Response(status_code=204)
