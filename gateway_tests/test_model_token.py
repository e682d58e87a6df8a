"""Model credentials end to end with the REAL codex app-server as the child (no gateway core).

Each test renders a CODEX_HOME with ``render_config_toml`` and the provider block of
``SessionModelCredentials``, spawns ``codex app-server --listen ws://127.0.0.1:0`` with the
environment a session would give it, runs turns over the app-server protocol, and checks what
the fake model server received. The session's refresh task (``keep_fresh``) runs in the test's
nursery, exactly as it runs in a session's nursery.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx2
import pytest
import structlog
import trio
import trio_websocket

from gateway.codex_home.config_toml import CodexConfig, render_config_toml
from gateway.config import Config, load_config
from gateway.credentials import SessionModelCredentials
from gateway_tests.fakes.fake_agentserver import FakeAgentserver
from gateway_tests.fakes.fake_model_server import FakeModelServer
from gateway_tests.process_trees import secrets_in_processes
from gateway_tests.real_app_server import AppServer, run_app_server

SECRET = "agentserver-internal-secret"
STATIC_KEY = "sk-static-fallback-0123456789"
WORKSPACE = "ws-model-token"
# codex re-reads the token file this often in these tests (production: 30 s).
COMMAND_REFRESH = 0.5
TURN_TIMEOUT = 30.0


def make_config(agentserver_url: str, model_base_url: str, *, static_key: str | None) -> Config:
    environ = {
        "CXG_INBOUND_HMAC_SECRET": "dev",
        "CXG_AGENTSERVER_INTERNAL_URL": agentserver_url,
        "CXG_AGENTSERVER_INTERNAL_SECRET": SECRET,
        "CXG_MODEL_PROVIDER_BASE_URL": model_base_url,
        "CXG_MODEL_TOKEN_REFRESH_INTERVAL": "5m",
    }
    if static_key is not None:
        environ["CXG_CODEX_API_KEY"] = static_key
    return load_config(environ)


class AppServerClient:
    """A minimal app-server protocol client: requests, and notifications kept in order."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self.notifications: list[dict[str, Any]] = []

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        request_id = next(self._ids)
        await self._ws.send_message(
            json.dumps({"id": request_id, "method": method, "params": params})
        )
        while True:
            message = json.loads(await self._ws.get_message())
            if message.get("id") == request_id and "method" not in message:
                if "error" in message:
                    raise AssertionError(f"{method} failed: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            self._keep(message)

    def _keep(self, message: dict[str, Any]) -> None:
        if "method" in message and "id" in message:
            raise AssertionError(f"unexpected server request {message['method']}")
        self.notifications.append(message)

    async def next_notification(self, method: str) -> dict[str, Any]:
        """The first buffered or upcoming notification called ``method`` (consumed)."""
        while True:
            for index, message in enumerate(self.notifications):
                if message.get("method") == method:
                    del self.notifications[index]
                    params: dict[str, Any] = message["params"]
                    return params
            self._keep(json.loads(await self._ws.get_message()))

    async def handshake(self) -> str:
        """initialize / initialized / thread/start; returns the thread id."""
        await self.request(
            "initialize", {"clientInfo": {"name": "credentials-test", "version": "1.0"}}
        )
        await self._ws.send_message(json.dumps({"method": "initialized"}))
        started = await self.request("thread/start", {})
        thread_id: str = started["thread"]["id"]
        return thread_id

    async def turn(self, thread_id: str, text: str) -> dict[str, Any]:
        """Run one turn to its end; returns the ``turn`` of ``turn/completed``."""
        started = await self.request(
            "turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": text}]}
        )
        turn_id = started["turn"]["id"]
        with trio.fail_after(TURN_TIMEOUT):
            while True:
                completed = await self.next_notification("turn/completed")
                if completed["turn"]["id"] == turn_id:
                    turn: dict[str, Any] = completed["turn"]
                    return turn


def agent_text(turn: dict[str, Any]) -> str:
    return "".join(i.get("text", "") for i in turn["items"] if i.get("type") == "agentMessage")


@attrs.define
class Rig:
    """Everything one test wires together."""

    agentserver: FakeAgentserver
    model: FakeModelServer
    creds: SessionModelCredentials
    server: AppServer
    client: AppServerClient
    thread_id: str
    codex_home: Path


def assert_token_nowhere(
    rig: Rig, secrets: list[str], logs: Sequence[MutableMapping[str, Any]]
) -> None:
    """No secret in any environ/cmdline under the child, its stderr, our logs or CODEX_HOME."""
    assert secrets
    assert not secrets_in_processes(rig.server.pid, secrets)
    shown = repr(logs).encode()
    for secret in secrets:
        assert secret.encode() not in rig.server.stderr, "token in the child's log output"
        assert secret.encode() not in shown, "token in the gateway's log output"
    # The token file lives in the runtime directory, outside CODEX_HOME (and its archive).
    assert not rig.creds.token_file.is_relative_to(rig.codex_home)
    for path in rig.codex_home.rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            content = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in content, f"token in {path}"


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient() as client:
        yield client


async def start_rig(
    nursery: trio.Nursery,
    tmp_path: Path,
    codex_bin: Path,
    http: httpx2.AsyncClient,
    agentserver: FakeAgentserver,
    accept: Callable[[str], bool],
    *,
    static_key: str | None = None,
    retry_initial: float = 1.0,
) -> Rig:
    """Start the fakes, prime the credentials, spawn the real codex, open a thread."""
    model = FakeModelServer(accept=accept)
    agentserver_url = await nursery.start(agentserver.serve)
    model_url = await nursery.start(model.serve)
    config = make_config(agentserver_url, f"{model_url}/v1", static_key=static_key)

    codex_home = tmp_path / "codex-home"
    runtime = tmp_path / "runtime"
    codex_home.mkdir(mode=0o700)
    runtime.mkdir(mode=0o700)
    creds = SessionModelCredentials(
        config,
        http,
        WORKSPACE,
        runtime,
        command_refresh_interval=COMMAND_REFRESH,
        retry_initial=retry_initial,
        retry_max=retry_initial * 4,
    )
    await creds.prime()
    codex_config = CodexConfig(model=config.model.model, provider=creds.provider())
    (codex_home / "config.toml").write_text(render_config_toml(codex_config))

    server = await nursery.start(run_app_server, codex_bin, codex_home, creds.child_env())
    ws = await trio_websocket.connect_websocket_url(nursery, server.url, max_message_size=2**24)
    client = AppServerClient(ws)
    with trio.fail_after(30):
        thread_id = await client.handshake()
    return Rig(agentserver, model, creds, server, client, thread_id, codex_home)


async def test_turns_survive_token_rotations_without_respawn(
    tmp_path: Path, real_codex_bin: Path, http: httpx2.AsyncClient, nursery: trio.Nursery
) -> None:
    agentserver = FakeAgentserver(internal_secret=SECRET)
    # A new token on every fetch at least 2 s after the last one, each valid for 4 s on paper;
    # the model server accepts only the most recent one, so every rotation forces codex to pick
    # up the new token (it re-runs the auth command after the 401 or on its refresh interval).
    agentserver.connect_modelserver(WORKSPACE, rotate_every=2.0, ttl=4.0)
    with structlog.testing.capture_logs() as logs:
        rig = await start_rig(
            nursery,
            tmp_path,
            real_codex_bin,
            http,
            agentserver,
            accept=lambda token: agentserver.token_valid(WORKSPACE, token),
        )
        pid = rig.server.pid
        nursery.start_soon(rig.creds.keep_fresh)

        turn = await rig.client.turn(rig.thread_id, "before any rotation")
        assert turn["status"] == "completed", turn
        assert agent_text(turn) == rig.model.default_text

        for rotation in range(1, 4):
            with trio.fail_after(20):
                await rig.creds.wait_for_version(1 + rotation)
            current = agentserver.current_token(WORKSPACE)
            assert rig.creds.token_file.read_text() == current
            turn = await rig.client.turn(rig.thread_id, f"after rotation {rotation}")
            assert turn["status"] == "completed", turn
            assert agent_text(turn) == rig.model.default_text
            assert rig.server.pid == pid and rig.server.process.returncode is None

        accepted = [r.token for r in rig.model.responses_requests()]
        assert len(accepted) == 4
        assert len(set(accepted)) == 4, "each turn ran with the token current at that time"
        assert set(accepted) <= set(agentserver.issued_tokens(WORKSPACE))
        assert_token_nowhere(rig, agentserver.issued_tokens(WORKSPACE), logs)
    assert rig.server.pid == pid


async def test_no_modelserver_connection_uses_static_key(
    tmp_path: Path, real_codex_bin: Path, http: httpx2.AsyncClient, nursery: trio.Nursery
) -> None:
    agentserver = FakeAgentserver(internal_secret=SECRET)  # no connection for WORKSPACE: 404
    with structlog.testing.capture_logs() as logs:
        rig = await start_rig(
            nursery,
            tmp_path,
            real_codex_bin,
            http,
            agentserver,
            accept=lambda token: token == STATIC_KEY,
            static_key=STATIC_KEY,
        )
        nursery.start_soon(rig.creds.keep_fresh)
        assert rig.creds.source == "static"
        assert agentserver.token_requests(WORKSPACE)[0].status == 404

        turn = await rig.client.turn(rig.thread_id, "hello")
        assert turn["status"] == "completed", turn
        assert agent_text(turn) == rig.model.default_text
        seen = {r.authorization for r in rig.model.requests}
        assert seen == {f"Bearer {STATIC_KEY}"}
        assert_token_nowhere(rig, [STATIC_KEY], logs)


async def test_agentserver_outage_keeps_old_token_and_retries(
    tmp_path: Path, real_codex_bin: Path, http: httpx2.AsyncClient, nursery: trio.Nursery
) -> None:
    agentserver = FakeAgentserver(internal_secret=SECRET)
    # 8 s tokens: the refresh task asks for a new one after 4 s. Any token that has not expired
    # is good for the model server, so a session on the old token works until it expires.
    agentserver.connect_modelserver(WORKSPACE, rotate_every=1.0, ttl=8.0)
    with structlog.testing.capture_logs() as logs:
        rig = await start_rig(
            nursery,
            tmp_path,
            real_codex_bin,
            http,
            agentserver,
            accept=lambda token: agentserver.token_valid(WORKSPACE, token, latest_only=False),
            static_key=STATIC_KEY,
            retry_initial=0.2,
        )
        first = agentserver.current_token(WORKSPACE)
        agentserver.outage = True
        nursery.start_soon(rig.creds.keep_fresh)

        with trio.fail_after(20):
            await agentserver.wait_until(
                lambda: sum(r.status == 503 for r in agentserver.token_requests()) >= 2
            )
        assert rig.creds.version == 1 and rig.creds.token_file.read_text() == first
        turn = await rig.client.turn(rig.thread_id, "during the outage")
        assert turn["status"] == "completed", turn
        assert rig.model.responses_requests()[-1].token == first

        agentserver.outage = False
        with trio.fail_after(20):
            await rig.creds.wait_for_version(2)
        second = agentserver.current_token(WORKSPACE)
        assert second != first and rig.creds.token_file.read_text() == second
        # The old token has not expired yet, so what codex sends next may still be it; make the
        # model server insist on the new one to see codex pick it up.
        rig.model.accept = lambda token: agentserver.token_valid(WORKSPACE, token)
        turn = await rig.client.turn(rig.thread_id, "after the outage")
        assert turn["status"] == "completed", turn
        assert rig.model.responses_requests()[-1].token == second

        failures = [e for e in logs if e["event"] == "model_token.refresh_failed"]
        assert len(failures) >= 2 and all("status=503" in f["error"] for f in failures)
        assert_token_nowhere(rig, [*agentserver.issued_tokens(WORKSPACE), STATIC_KEY], logs)
