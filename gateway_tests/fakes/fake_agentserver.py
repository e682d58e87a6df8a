"""An in-process fake of agentserver's internal API, for tests.

Formats follow ``reference/upstream-spec.md`` §3.3 (token verify) and §8.2 (ModelServer token):

* ``POST /api/internal/codex/tokens/verify`` — header ``X-Internal-Secret`` must equal the
  configured secret (else 401); body ``{"token": "..."}``; 200 ``{"user_id", "workspace_id"}``
  for a known token, 401 ``{"error": "invalid_token"}`` for anything else.
* ``GET /internal/workspaces/{id}/modelserver-token`` — 200 ``{"access_token", "expires_at"}``
  (RFC 3339, nanosecond precision like Go's ``time.Time``), 404 when the workspace has no
  ModelServer connection. Requires ``X-Internal-Secret`` too (the Go client sent none; this
  gateway sends it, and the fake checks that it does).

Usage::

    fake = FakeAgentserver(internal_secret="s3cret")
    fake.add_verify_token("ast_abc", user_id="u1", workspace_id="ws1")
    fake.connect_modelserver("ws1", rotate_every=2.0, ttl=4.0)
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(fake.serve)
        ...
        nursery.cancel_scope.cancel()

Every knob is a plain attribute or method; tests may change them while the server runs.
Rotation is lazy: a ModelServer token request that arrives ``rotate_every`` seconds or more after
the current token was minted mints the next one, so "the token issued most recently" is always
the one the last caller received (``current_token``).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from urllib.parse import unquote

import attrs
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway_tests.fakes.serving import serve_on_loopback

VERIFY_PATH = "/api/internal/codex/tokens/verify"
# ``:path`` so that an id with an escaped "/" still reaches the handler (and gets a 404).
MODELSERVER_TOKEN_PATH = "/internal/workspaces/{workspace_id:path}/modelserver-token"


def rfc3339(moment: dt.datetime) -> str:
    """Format like Go's ``time.Time`` JSON (RFC 3339 with nanoseconds, ``Z`` for UTC)."""
    moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}000Z"


@attrs.define
class RecordedRequest:
    """One request the fake received.

    ``path`` is the raw path as sent (still percent-encoded); header names are lower-cased.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0


@attrs.define
class ModelserverGrant:
    """A workspace's ModelServer connection and the tokens minted for it so far."""

    workspace_id: str
    rotate_every: float | None = None
    ttl: float | None = 3600.0
    empty: bool = False
    tokens: list[str] = attrs.field(factory=list)
    expires: dict[str, float] = attrs.field(factory=dict)  # token -> wall-clock expiry
    minted_at: float = 0.0  # time.monotonic() of the current token


class FakeAgentserver:
    """agentserver's internal API, served by hypercorn on 127.0.0.1 with a free port."""

    def __init__(self, internal_secret: str = "internal-secret") -> None:
        self.internal_secret = internal_secret
        #: When true every request gets 503 (agentserver down behind its load balancer).
        self.outage = False
        self.verify_tokens: dict[str, tuple[str, str]] = {}
        self.grants: dict[str, ModelserverGrant] = {}
        self.requests: list[RecordedRequest] = []
        self.base_url = ""
        self._counter = 0
        self._changed = trio.Event()
        self.app = Starlette(
            routes=[
                Route(VERIFY_PATH, self._verify, methods=["POST"]),
                Route(MODELSERVER_TOKEN_PATH, self._modelserver_token, methods=["GET"]),
            ]
        )

    # -- knobs -------------------------------------------------------------------------------

    def add_verify_token(self, token: str, *, user_id: str, workspace_id: str) -> None:
        """Make ``token`` verify as ``(user_id, workspace_id)``."""
        self.verify_tokens[token] = (user_id, workspace_id)

    def remove_verify_token(self, token: str) -> None:
        """Revoke ``token``: it now verifies as 401 ``invalid_token``."""
        self.verify_tokens.pop(token, None)

    def connect_modelserver(
        self,
        workspace_id: str,
        *,
        rotate_every: float | None = None,
        ttl: float | None = 3600.0,
        empty: bool = False,
    ) -> ModelserverGrant:
        """Give ``workspace_id`` a ModelServer connection.

        ``rotate_every``: mint a new token on the first request at least that many seconds after
        the current one was minted (None: never rotate on its own). ``ttl``: ``expires_at`` is
        mint time plus ``ttl`` (None: the field is omitted). ``empty``: answer 200 with an empty
        ``access_token`` (agentserver's other way of saying "no connection").
        """
        grant = ModelserverGrant(workspace_id, rotate_every=rotate_every, ttl=ttl, empty=empty)
        self.grants[workspace_id] = grant
        return grant

    def disconnect_modelserver(self, workspace_id: str) -> None:
        """Remove the workspace's ModelServer connection: the token endpoint answers 404."""
        self.grants.pop(workspace_id, None)

    def rotate(self, workspace_id: str) -> str:
        """Mint the workspace's next token now and return it."""
        grant = self.grants[workspace_id]
        self._counter += 1
        token = f"mst_{workspace_id}_{self._counter:06d}"
        grant.tokens.append(token)
        grant.minted_at = time.monotonic()
        if grant.ttl is not None:
            grant.expires[token] = time.time() + grant.ttl
        return token

    def current_token(self, workspace_id: str) -> str:
        """The token minted most recently for the workspace (minting the first one if needed)."""
        grant = self.grants[workspace_id]
        if not grant.tokens:
            return self.rotate(workspace_id)
        return grant.tokens[-1]

    def issued_tokens(self, workspace_id: str) -> list[str]:
        """Every token minted for the workspace, oldest first."""
        grant = self.grants.get(workspace_id)
        return list(grant.tokens) if grant else []

    def token_valid(self, workspace_id: str, token: str, *, latest_only: bool = True) -> bool:
        """Whether a model server should accept ``token`` for the workspace.

        ``latest_only``: only the most recently minted token is valid (what the rotation tests
        use). Otherwise any token minted for the workspace that has not yet expired is valid.
        """
        grant = self.grants.get(workspace_id)
        if grant is None or not grant.tokens:
            return False
        if latest_only:
            return token == grant.tokens[-1]
        if token not in grant.tokens:
            return False
        expiry = grant.expires.get(token)
        return expiry is None or time.time() < expiry

    def request_count(self, path_prefix: str = "") -> int:
        """How many requests (whatever their status) had a path starting with ``path_prefix``."""
        return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    def token_requests(self, workspace_id: str | None = None) -> list[RecordedRequest]:
        """The ModelServer token requests received, optionally for one workspace only."""
        return [
            r
            for r in self.requests
            if r.path.endswith("/modelserver-token")
            and (workspace_id is None or _workspace_of(r.path) == workspace_id)
        ]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds, re-checking after every request the fake answers.

        Put a ``trio.fail_after`` around it; there is no timeout here.
        """
        while not condition():
            changed = self._changed
            await changed.wait()

    async def wait_for_requests(self, count: int, path_prefix: str = "") -> None:
        """Return once at least ``count`` requests under ``path_prefix`` have been answered."""
        await self.wait_until(lambda: self.request_count(path_prefix) >= count)

    # -- serving -----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; report the base URL (``http://127.0.0.1:PORT``) when bound."""
        async with trio.open_nursery() as nursery:
            self.base_url = await nursery.start(serve_on_loopback, self.app)
            task_status.started(self.base_url)

    def _record(self, request: Request, body: bytes) -> RecordedRequest:
        recorded = RecordedRequest(
            method=request.method,
            path=request.scope.get("raw_path", b"").decode("latin-1") or request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        self.requests.append(recorded)
        return recorded

    def _answer(self, recorded: RecordedRequest, response: Response) -> Response:
        recorded.status = response.status_code
        # Wake waiters only once the status is known, so they can look at it.
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        return response

    def _secret_ok(self, request: Request) -> bool:
        return request.headers.get("x-internal-secret") == self.internal_secret

    async def _verify(self, request: Request) -> Response:
        body = await request.body()
        recorded = self._record(request, body)
        if self.outage:
            return self._answer(recorded, JSONResponse({"error": "unavailable"}, 503))
        if not self._secret_ok(request):
            return self._answer(recorded, JSONResponse({"error": "unauthorized"}, 401))
        invalid = JSONResponse({"error": "invalid_token"}, 401)
        try:
            token = json.loads(body)["token"]
        except (ValueError, KeyError, TypeError):
            return self._answer(recorded, invalid)
        identity = self.verify_tokens.get(token) if isinstance(token, str) else None
        if identity is None:
            return self._answer(recorded, invalid)
        user_id, workspace_id = identity
        return self._answer(
            recorded, JSONResponse({"user_id": user_id, "workspace_id": workspace_id})
        )

    async def _modelserver_token(self, request: Request) -> Response:
        recorded = self._record(request, await request.body())
        if self.outage:
            return self._answer(recorded, JSONResponse({"error": "unavailable"}, 503))
        if not self._secret_ok(request):
            return self._answer(recorded, JSONResponse({"error": "unauthorized"}, 401))
        workspace_id = _workspace_of(recorded.path)
        grant = self.grants.get(workspace_id)
        if grant is None:
            return self._answer(recorded, JSONResponse({"error": "not_found"}, 404))
        if grant.empty:
            return self._answer(recorded, JSONResponse({"access_token": "", "expires_at": ""}))
        due = grant.rotate_every is not None and (
            time.monotonic() - grant.minted_at >= grant.rotate_every
        )
        token = self.rotate(workspace_id) if not grant.tokens or due else grant.tokens[-1]
        payload: dict[str, str] = {"access_token": token}
        expiry = grant.expires.get(token)
        if expiry is not None:
            payload["expires_at"] = rfc3339(dt.datetime.fromtimestamp(expiry, dt.UTC))
        return self._answer(recorded, JSONResponse(payload))


def _workspace_of(path: str) -> str:
    """The (unescaped) workspace id of a ``/internal/workspaces/{id}/modelserver-token`` path."""
    prefix, suffix = "/internal/workspaces/", "/modelserver-token"
    return unquote(path[len(prefix) : -len(suffix)])
