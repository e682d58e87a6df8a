"""Test harness: the gateway in-process on a loopback port, and a small JSON-RPC client.

The daemon under test is the real one (``run_daemon``), on real sockets, with a real child
process (the fake codex or the pinned real codex); only its stop trigger is an event instead
of a signal. Tests that need signals and exit codes run ``python -m gateway serve`` instead.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx2
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from gateway.auth.tokens import mint_hmac_token
from gateway.config import Config, load_config
from gateway.daemon import run_daemon
from gateway.replicas.placement import Placement
from gateway.web.websocket import PolicyFactory

HMAC_SECRET = "test-inbound-hmac-secret"
ADMIN_SECRET = "test-admin-secret"
MAX_MESSAGE = 128 << 20
# How often a condition without an event source (a file, a process table) is re-checked.
POLL_INTERVAL = 0.02


_daemon_counter = itertools.count()


def child_uid_range() -> str:
    """A uid range no other test daemon of this machine is likely to hold at the same time.

    Each daemon reaps its uids with ``kill(-1)`` as that uid when a session ends, so two
    daemons sharing a range would kill each other's children: every daemon of this test
    process gets its own 64 uids, and test processes are spread by their pid.
    """
    first = 200_000 + (os.getpid() % 2000) * 2048 + (next(_daemon_counter) % 32) * 64
    return f"{first}-{first + 63}"


def gateway_env(tmp_path: Path, codex_bin: Path | str, **overrides: str) -> dict[str, str]:
    """A complete environment for a test daemon: dev auth, local store, loopback port 0."""
    env = {
        "CXG_CHILD_UID_RANGE": child_uid_range(),
        "CXG_INBOUND_HMAC_SECRET": HMAC_SECRET,
        # Tests that add the agentserver verifier still connect with development tokens.
        "CXG_ALLOW_HMAC_TOKENS": "true",
        "CXG_ADMIN_SECRET": ADMIN_SECRET,
        "CXG_TMP_ROOT": str(tmp_path / "sessions"),
        "CXG_LOCAL_STORE_DIR": str(tmp_path / "store"),
        "CXG_LISTEN_ADDR": "127.0.0.1:0",
        "CXG_CODEX_BIN": str(codex_bin),
        "CXG_LOG_FORMAT": "text",
        "CXG_CHILD_STOP_GRACE": "5s",
        "CXG_CHECKPOINT_INTERVAL": "0",
        # The fake codex's own test methods (fake/echo, fake/close, ...).
        "CXG_POLICY_EXTRA_METHODS": "fake/*",
    }
    env.update(overrides)
    return env


def token_for(workspace_id: str) -> str:
    """A valid development token for ``workspace_id``."""
    return mint_hmac_token(HMAC_SECRET.encode(), workspace_id)


async def admin_sessions(http_url: str) -> list[dict[str, Any]]:
    """``GET /admin/sessions`` of the daemon serving at ``http_url`` (in-process or not)."""
    async with httpx2.AsyncClient(timeout=60) as http:
        response = await http.get(
            f"{http_url}/admin/sessions", headers={"Authorization": f"Bearer {ADMIN_SECRET}"}
        )
    response.raise_for_status()
    sessions: list[dict[str, Any]] = response.json()["sessions"]
    return sessions


async def admin_restart(
    http_url: str, workspace_id: str, token: str = ADMIN_SECRET
) -> httpx2.Response:
    """``POST /admin/sessions/restart`` of ``workspace_id`` on the daemon at ``http_url``."""
    async with httpx2.AsyncClient(timeout=60) as http:
        return await http.post(
            f"{http_url}/admin/sessions/restart",
            json={"workspaceId": workspace_id},
            headers={"Authorization": f"Bearer {token}"},
        )


@attrs.define
class RunningGateway:
    """A daemon running in the test's nursery."""

    config: Config
    http_url: str
    stop: trio.Event
    stopped: trio.Event

    @property
    def ws_url(self) -> str:
        """The WebSocket URL clients connect to."""
        return "ws://" + self.http_url.removeprefix("http://") + "/"

    @property
    def store_dir(self) -> Path:
        """Where the local store keeps archives."""
        return Path(self.config.local_store_dir)

    def archive_path(self, workspace_id: str) -> Path:
        """The local store's file for a workspace's archive."""
        return self.store_dir / "codex-app-gateway" / f"{workspace_id}.tar.gz"

    async def sessions(self) -> list[dict[str, Any]]:
        """``GET /admin/sessions``."""
        return await admin_sessions(self.http_url)

    async def session(self, workspace_id: str) -> dict[str, Any] | None:
        """The admin listing's entry for one workspace."""
        for entry in await self.sessions():
            if entry["workspaceId"] == workspace_id:
                return entry
        return None

    async def restart(self, workspace_id: str, token: str = ADMIN_SECRET) -> httpx2.Response:
        """``POST /admin/sessions/restart``."""
        return await admin_restart(self.http_url, workspace_id, token)

    async def shutdown(self) -> None:
        """Drain and stop the daemon, waiting until it has."""
        self.stop.set()
        await self.stopped.wait()


async def real_codex_vars(**overrides: str) -> dict[str, str]:
    """The variables of a gateway whose child is the real codex, with an unreachable model.

    The model provider is a closed loopback port (a turn records the user message, then keeps
    retrying until it is interrupted); the generous ready timeout is for a busy machine.
    """
    return {
        "CXG_MODEL_PROVIDER_BASE_URL": f"http://127.0.0.1:{await closed_port()}/v1",
        "CXG_CHILD_READY_TIMEOUT": "60s",
        **overrides,
    }


async def real_codex_env(tmp_path: Path, real_codex_bin: Path, **overrides: str) -> dict[str, str]:
    """``gateway_env`` for the real codex as the child, with ``real_codex_vars``."""
    return gateway_env(tmp_path, real_codex_bin, **await real_codex_vars(**overrides))


# What the ``launch_gateway`` fixture gives a test:
# ``await launch(codex_bin=None, *, policy_for=None, **env)``.
LaunchGateway = Callable[..., Awaitable["RunningGateway"]]


async def start_gateway(
    nursery: trio.Nursery,
    env: Mapping[str, str],
    *,
    policy_for: PolicyFactory | None = None,
    placement: Placement | None = None,
) -> RunningGateway:
    """Start ``run_daemon`` in ``nursery`` and return once it listens."""
    config = load_config(env)
    stop, stopped = trio.Event(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await run_daemon(
                config,
                stop=stop,
                policy_for=policy_for,
                placement=placement,
                task_status=task_status,
            )
        finally:
            stopped.set()

    urls: list[str] = await nursery.start(run)
    return RunningGateway(config=config, http_url=urls[0], stop=stop, stopped=stopped)


class Rpc:
    """A JSON-RPC-lite client over one WebSocket (what ``codex --remote`` speaks)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._next_id = 1
        self.notifications: list[dict[str, Any]] = []

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message as one text frame."""
        await self.ws.send_message(json.dumps(message))

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and return its response, keeping notifications that arrive first."""
        request_id = self._next_id
        self._next_id += 1
        await self.send({"id": request_id, "method": method, "params": dict(params or {})})
        while True:
            message = json.loads(await self.ws.get_message())
            if message.get("id") == request_id and "method" not in message:
                return dict(message)
            self.notifications.append(message)

    async def result(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """``call`` that insists on success."""
        response = await self.call(method, params)
        assert "result" in response, response
        return response["result"]

    async def initialize(self) -> dict[str, Any]:
        """The handshake every connection starts with."""
        result: dict[str, Any] = await self.result(
            "initialize", {"clientInfo": {"name": "gateway-tests", "version": "1.0"}}
        )
        await self.send({"method": "initialized"})
        return result

    async def closed(self, *, within: float = 5.0) -> CloseReason:
        """Read until the gateway closes this connection; return its close code and reason."""
        with trio.fail_after(within):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as closed:
                assert closed.reason is not None
                return closed.reason

    async def wait_for(
        self, method: str, predicate: Callable[[dict[str, Any]], bool] = lambda _: True
    ) -> dict[str, Any]:
        """Wait for a notification (or server request) with ``method``."""
        for seen in self.notifications:
            if seen.get("method") == method and predicate(seen):
                self.notifications.remove(seen)
                return seen
        while True:
            message = json.loads(await self.ws.get_message())
            if message.get("method") == method and predicate(message):
                return dict(message)
            self.notifications.append(message)


@asynccontextmanager
async def connect_url(
    url: str, token: str | None = None, *, initialize: bool = True
) -> AsyncIterator[Rpc]:
    """Open a client WebSocket to ``url``, presenting ``token`` if given; initialize it.

    ``url`` is a gateway's (``connect`` is the short form) or an app-server's run directly.
    """
    headers = bearer(token) if token is not None else []
    async with open_websocket_url(
        url, extra_headers=headers, max_message_size=MAX_MESSAGE, connect_timeout=30
    ) as ws:
        rpc = Rpc(ws)
        if initialize:
            await rpc.initialize()
        yield rpc


def connect(
    gateway: RunningGateway, workspace_id: str, *, initialize: bool = True
) -> AbstractAsyncContextManager[Rpc]:
    """Open a client WebSocket to ``gateway`` as ``workspace_id`` (a development token)."""
    return connect_url(gateway.ws_url, token_for(workspace_id), initialize=initialize)


async def rejected_connect(
    url: str, headers: list[tuple[bytes, bytes]] | None = None, *, within: float = 30.0
) -> ConnectionRejected:
    """Open a WebSocket to ``url`` that must be refused; return the refusal (status, body)."""
    with trio.fail_after(within):
        try:
            async with open_websocket_url(url, extra_headers=headers or [], connect_timeout=within):
                pass
        except ConnectionRejected as refused:
            return refused
    raise AssertionError(f"the connect to {url} was accepted")


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    """The ``Authorization`` header for ``token``."""
    return [(b"authorization", f"Bearer {token}".encode())]


async def eventually(predicate: Callable[[], bool], *, within: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, for conditions that have no event to wait on.

    A file appearing or a process disappearing notifies nobody, so these are re-checked every
    ``POLL_INTERVAL``, bounded by ``within`` seconds.
    """
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - no event source exists for these conditions
            await trio.sleep(POLL_INTERVAL)


TCP_LISTEN = "0A"


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on, from its fds and its view of /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN and inode in inodes:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


async def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): an unreachable service."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def process_environ(pid: int) -> dict[str, str]:
    """Another process's environment, from /proc."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {key.decode(): value.decode("utf-8", "replace") for key, value in pairs}
