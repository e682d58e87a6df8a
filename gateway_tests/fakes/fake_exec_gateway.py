"""An in-process fake of codex-exec-gateway, for tests.

Formats follow ``reference/upstream-spec.md`` §7 and §8.1:

* ``GET /api/exec-gateway/connected?workspace_id=<id>`` — ``Authorization: Bearer <internal
  secret>`` (else 401); 200 with a JSON array of ``{exe_id, description, default_cwd,
  is_default, last_seen_at}`` for the executors of that workspace that are connected.
* WebSocket ``/bridge/<exe_id>`` — ``Authorization: Bearer <capability token>`` verified with
  :func:`gateway.captoken.verify_cap_token`: 401 for a missing, bad, expired or revoked token;
  403 ``exe_id not in token allow set`` when the token does not list the executor, and 403
  ``exe_id not in token workspace`` when the executor belongs to another workspace; 503
  ``executor not connected`` for an unknown or disconnected executor. An accepted connection is
  relayed frame for frame (text stays text, binary stays binary) to the executor's backend — in
  the tests a real ``codex exec-server --listen ws://127.0.0.1:0``.

Usage::

    fake = FakeExecGateway(internal_secret="in-s3cret", captoken_secret=b"cap-s3cret")
    fake.add_executor("exe_alpha", workspace_id="ws_a", backend_url=exec_server_url)
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(fake.serve)   # http://127.0.0.1:PORT
        fake.ws_url                                  # ws://127.0.0.1:PORT
        ...
        nursery.cancel_scope.cancel()

Every knob is a plain attribute or method; tests may change them while the server runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import trio
import trio_websocket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.captoken import CapTokenError, verify_cap_token
from gateway_tests.fakes.serving import serve_on_loopback

CONNECTED_PATH = "/api/exec-gateway/connected"


@attrs.define
class FakeExecutor:
    """One executor known to the fake, bound to one workspace."""

    exe_id: str
    workspace_id: str
    backend_url: str | None
    description: str = ""
    default_cwd: str = ""
    is_default: bool = False
    connected: bool = True


@attrs.define
class BridgeAttempt:
    """One WebSocket upgrade on ``/bridge/…`` and how it was answered."""

    exe_id: str
    status: int
    reason: str
    authorization: str | None


@attrs.define
class FakeExecGateway:
    """The fake server; see the module docstring."""

    internal_secret: str
    captoken_secret: bytes
    executors: dict[str, FakeExecutor] = attrs.field(factory=dict)
    revoked_turns: set[str] = attrs.field(factory=set)
    outage: bool = False
    connected_requests: list[dict[str, Any]] = attrs.field(factory=list)
    bridge_attempts: list[BridgeAttempt] = attrs.field(factory=list)
    base_url: str = ""
    # Called with each frame a bridge client sends (and its number on that bridge, from 1)
    # before it is relayed: a test's way to act at an exact point of a call.
    on_client_frame: Callable[[int, str | bytes], None] | None = None
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def add_executor(
        self,
        exe_id: str,
        *,
        workspace_id: str,
        backend_url: str | None,
        description: str = "",
        default_cwd: str = "",
        is_default: bool = False,
    ) -> FakeExecutor:
        """Register a connected executor of ``workspace_id`` relaying to ``backend_url``."""
        executor = FakeExecutor(
            exe_id=exe_id,
            workspace_id=workspace_id,
            backend_url=backend_url,
            description=description,
            default_cwd=default_cwd,
            is_default=is_default,
        )
        self.executors[exe_id] = executor
        return executor

    @property
    def ws_url(self) -> str:
        """The base the gateway renders bridge URLs under (``CXG_EXEC_GATEWAY_URL``)."""
        return "ws" + self.base_url.removeprefix("http")

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(CONNECTED_PATH, self._connected, methods=["GET"]),
                WebSocketRoute("/bridge/{exe_id:path}", self._bridge),
            ]
        )

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; report the base URL (``http://127.0.0.1:PORT``) when bound."""
        async with trio.open_nursery() as nursery:
            self.base_url = await nursery.start(serve_on_loopback, self.app)
            task_status.started(self.base_url)

    async def wait_for_bridge_attempts(self, count: int) -> list[BridgeAttempt]:
        """Wait until at least ``count`` bridge upgrades were answered."""
        while len(self.bridge_attempts) < count:
            await self._changed.wait()
        return self.bridge_attempts

    def _note(self, attempt: BridgeAttempt) -> None:
        self.bridge_attempts.append(attempt)
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _connected(self, request: Request) -> Response:
        self.connected_requests.append(
            {"headers": dict(request.headers), "query": dict(request.query_params)}
        )
        if self.outage:
            return JSONResponse({"error": "unavailable"}, 503)
        if request.headers.get("authorization") != f"Bearer {self.internal_secret}":
            return JSONResponse({"error": "unauthorized"}, 401)
        workspace_id = request.query_params.get("workspace_id", "")
        if not workspace_id:
            return JSONResponse({"error": "workspace_id required"}, 400)
        seen = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return JSONResponse(
            [
                {
                    "exe_id": e.exe_id,
                    "description": e.description,
                    "default_cwd": e.default_cwd,
                    "is_default": e.is_default,
                    "last_seen_at": seen,
                }
                for e in self.executors.values()
                if e.workspace_id == workspace_id and e.connected
            ]
        )

    def _authorise(self, exe_id: str, authorization: str | None) -> tuple[int, str]:
        """The exec gateway's checks, in its order; ``(0, "")`` means accepted."""
        if not authorization or not authorization.startswith("Bearer "):
            return 401, "missing Bearer"
        try:
            payload = verify_cap_token(authorization.removeprefix("Bearer "), self.captoken_secret)
        except CapTokenError as exc:
            return 401, str(exc)
        if payload.turn_id in self.revoked_turns:
            return 401, "turn revoked"
        if not payload.allows_exe_id(exe_id):
            return 403, "exe_id not in token allow set"
        executor = self.executors.get(exe_id)
        if executor is None or not executor.connected or executor.backend_url is None:
            return 503, "executor not connected"
        if executor.workspace_id != payload.workspace_id:
            return 403, "exe_id not in token workspace"
        return 0, ""

    async def _bridge(self, websocket: WebSocket) -> None:
        exe_id = websocket.path_params["exe_id"]
        authorization = websocket.headers.get("authorization")
        status, reason = self._authorise(exe_id, authorization)
        if status:
            self._note(BridgeAttempt(exe_id, status, reason, authorization))
            await websocket.send_denial_response(PlainTextResponse(reason, status))
            return
        backend_url = self.executors[exe_id].backend_url
        assert backend_url is not None
        await websocket.accept()
        self._note(BridgeAttempt(exe_id, 101, "", authorization))
        try:
            async with (
                trio_websocket.open_websocket_url(
                    backend_url, max_message_size=64 * 1024 * 1024
                ) as backend,
                trio.open_nursery() as nursery,
            ):
                scope, hook = nursery.cancel_scope, self.on_client_frame
                nursery.start_soon(_client_to_backend, websocket, backend, scope, hook)
                nursery.start_soon(_backend_to_client, backend, websocket, nursery.cancel_scope)
        except (trio_websocket.HandshakeError, OSError):
            await websocket.close(code=1011, reason="executor backend unreachable")


async def _client_to_backend(
    websocket: WebSocket,
    backend: trio_websocket.WebSocketConnection,
    scope: trio.CancelScope,
    on_frame: Callable[[int, str | bytes], None] | None = None,
) -> None:
    count = 0
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            count += 1
            if on_frame is not None:
                on_frame(count, data)
            await backend.send_message(data)
    except (WebSocketDisconnect, trio_websocket.ConnectionClosed):
        pass
    scope.cancel()


async def _backend_to_client(
    backend: trio_websocket.WebSocketConnection, websocket: WebSocket, scope: trio.CancelScope
) -> None:
    try:
        while True:
            data = await backend.get_message()
            if isinstance(data, str):
                await websocket.send_text(data)
            else:
                await websocket.send_bytes(data)
    except trio_websocket.ConnectionClosed:
        await _close_quietly(websocket)
    except (WebSocketDisconnect, RuntimeError):
        pass
    scope.cancel()


async def _close_quietly(websocket: WebSocket) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close(code=1011, reason="executor disconnected")


async def run_exec_server(
    codex_bin: str | os.PathLike[str],
    codex_home: str | os.PathLike[str],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a real ``codex exec-server --listen ws://127.0.0.1:0`` until cancelled.

    Reports the ``ws://127.0.0.1:PORT`` URL the server prints on stdout once it listens.
    """
    env = {**os.environ, "CODEX_HOME": os.fspath(codex_home)}
    command = [os.fspath(codex_bin), "exec-server", "--listen", "ws://127.0.0.1:0"]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, stdout=subprocess.PIPE, env=env, check=False)
        )
        assert process.stdout is not None
        buffer = b""
        while b"\n" not in buffer:
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"codex exec-server exited before printing its URL: {buffer!r}")
            buffer += chunk
        url = buffer.split(b"\n", 1)[0].decode().strip()
        if not url.startswith("ws://"):
            raise RuntimeError(f"codex exec-server printed {url!r} instead of its URL")
        nursery.start_soon(_drain, process.stdout)
        task_status.started(url)


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    # Whatever else the server prints must not fill the pipe and stall it.
    while await stream.receive_some():
        pass
