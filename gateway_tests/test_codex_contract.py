"""The contract the gateway relies on, checked against BOTH the fake codex and the real 0.169.0.

Every test here is parametrized over the two binaries, so the fake cannot drift from what it
claims to reproduce: the stderr banner, ``/readyz`` and ``/healthz``, the capability token's 401,
the ``Origin`` 403, JSON-RPC error shapes, close codes, SIGTERM, and the answers to the methods
the real TUI calls at start-up, validated against the real binary's own generated JSON schema
(``codex app-server generate-json-schema --experimental``).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from gateway_tests.app_server_process import (
    UPGRADE_HEADERS,
    Client,
    FakeProcess,
    child_env,
    http_get,
    running_fake,
)
from gateway_tests.harness import bearer, rejected_connect

TOKEN = "contract-capability-token"
AUTH_ARGS = (
    "--ws-auth",
    "capability-token",
    "--ws-token-sha256",
    hashlib.sha256(TOKEN.encode()).hexdigest(),
)
# The gateway renders a custom provider into config.toml; both binaries get the same one.
CONFIG_TOML = (
    'model = "contract-model"\nmodel_provider = "gw"\n'
    '[model_providers.gw]\nname = "gw"\nbase_url = "http://127.0.0.1:9/v1"\n'
    'wire_api = "responses"\n'
)
# Requests the real TUI sends at start-up and in a plain conversation (before any turn), with
# the parameters it needs; "THREAD" is replaced by the id of a started thread.
TUI_BOOTSTRAP: list[tuple[str, dict[str, Any]]] = [
    ("account/read", {"refreshToken": False}),
    ("account/bedrock/checkGovCloudRequirements", {}),
    ("model/list", {}),
    ("hooks/list", {}),
    ("config/read", {"includeLayers": False}),
    ("configRequirements/read", {}),
    ("collaborationMode/list", {}),
    ("skills/list", {}),
    ("plugin/installed", {}),
    ("experimentalFeature/list", {}),
    ("permissionProfile/list", {}),
    ("thread/start", {}),
    ("thread/list", {}),
    ("thread/search", {"searchTerm": "anything"}),
    ("thread/loaded/list", {}),
    ("thread/read", {"threadId": "THREAD"}),
    ("thread/goal/get", {"threadId": "THREAD"}),
    ("thread/backgroundTerminals/list", {"threadId": "THREAD"}),
    ("thread/settings/update", {"threadId": "THREAD"}),
    ("turn/start", {"threadId": "THREAD", "input": [{"type": "text", "text": "hi"}]}),
    ("thread/unsubscribe", {"threadId": "THREAD"}),
]


@pytest.fixture(params=["fake", "real"])
def codex(request: pytest.FixtureRequest, fake_codex_bin: Path, real_codex_bin: Path) -> Path:
    """The binary under test: the fake codex, then the pinned real one."""
    return fake_codex_bin if request.param == "fake" else real_codex_bin


@pytest.fixture(scope="session")
def schema_dir(tmp_path_factory: pytest.TempPathFactory, real_codex_bin: Path) -> Path:
    """The real binary's JSON schema of every message (experimental methods included)."""
    out = tmp_path_factory.mktemp("codex-schema")
    subprocess.run(
        [str(real_codex_bin), "app-server", "generate-json-schema", "--experimental", "--out", out],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def response_schema(schema_dir: Path, method: str) -> dict[str, Any]:
    """The schema of ``method``'s result: its params type's name with Response for Params."""
    requests = json.loads((schema_dir / "ClientRequest.json").read_text())
    for variant in requests["oneOf"]:
        if variant["properties"]["method"]["enum"] == [method]:
            ref = variant["properties"].get("params", {}).get("$ref", "")
            break
    else:
        raise AssertionError(f"{method} is not a client request of the real codex")
    name = ref.rsplit("/", 1)[-1].removesuffix("Params") + "Response"
    if not ref:  # methods without params, e.g. configRequirements/read
        name = "".join(part[:1].upper() + part[1:] for part in method.split("/")) + "Response"
    path = schema_dir / "v2" / f"{name}.json"
    assert path.exists(), f"no schema {name} for {method}"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


@asynccontextmanager
async def serving(codex: Path, home: Path, *args: str) -> AsyncIterator[FakeProcess]:
    """``codex app-server --listen ws://127.0.0.1:0 ARGS`` with the gateway's kind of config."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(CONFIG_TOML)
    async with running_fake(codex, home, *args, env=child_env(home, LANG="C.UTF-8")) as server:
        yield server


@asynccontextmanager
async def client(server: FakeProcess, token: str = TOKEN) -> AsyncIterator[Client]:
    """An initialized connection, as the TUI makes it (experimental API on)."""
    async with open_websocket_url(
        server.url, extra_headers=[(b"authorization", f"Bearer {token}".encode())]
    ) as ws:
        rpc = Client(ws)
        await rpc.send(
            {
                "id": "initialize",
                "method": "initialize",
                "params": {
                    "clientInfo": {"name": "codex-tui", "version": "0.169.0"},
                    "capabilities": {"experimentalApi": True},
                },
            }
        )
        while (await rpc.receive()).get("id") != "initialize":
            pass
        await rpc.send({"method": "initialized"})
        yield rpc


async def test_banner_health_and_origin(codex: Path, tmp_path: Path) -> None:
    async with serving(codex, tmp_path / "home", *AUTH_ARGS) as server:
        port = server.port
        banner = [line.strip() for line in server.lines]
        assert f"listening on: ws://127.0.0.1:{port}" in banner
        assert f"readyz: http://127.0.0.1:{port}/readyz" in banner
        assert f"healthz: http://127.0.0.1:{port}/healthz" in banner
        with trio.fail_after(10):
            assert (await http_get(port, "/readyz"))[0] == 200
            assert (await http_get(port, "/healthz"))[0] == 200
            status, _ = await http_get(
                port, "/", ("Origin", "https://evil.example"), *UPGRADE_HEADERS
            )
            assert status == 403


async def test_capability_token_is_enforced(codex: Path, tmp_path: Path) -> None:
    async with serving(codex, tmp_path / "home", *AUTH_ARGS) as server:
        with trio.fail_after(20):
            for headers in ([], bearer("wrong-token")):
                assert (await rejected_connect(server.url, headers)).status_code == 401
            async with client(server) as rpc:
                assert "threadId" not in await rpc.result("thread/loaded/list")


async def test_error_answers_have_the_json_rpc_shape(codex: Path, tmp_path: Path) -> None:
    async with serving(codex, tmp_path / "home", *AUTH_ARGS) as server:
        with trio.fail_after(20):
            async with client(server) as rpc:
                for method, params in (
                    ("no/such/method", {}),
                    ("thread/read", {"threadId": "not-a-thread-id"}),
                ):
                    answer = await rpc.call(method, params)
                    assert set(answer) == {"id", "error"}, answer
                    assert answer["id"] == rpc.next_id
                    error = answer["error"]
                    assert isinstance(error["code"], int) and -32700 <= error["code"] <= -32000
                    assert isinstance(error["message"], str) and error["message"]
                again = await rpc.call("initialize", {"clientInfo": {"name": "x", "version": "1"}})
                assert again["error"]["code"] == -32600


async def test_the_tui_bootstrap_answers_match_the_real_schema(
    codex: Path, tmp_path: Path, schema_dir: Path
) -> None:
    async with serving(codex, tmp_path / "home", *AUTH_ARGS) as server:
        with trio.fail_after(60):
            async with client(server) as rpc:
                thread_id = ""
                for method, params in TUI_BOOTSTRAP:
                    given = {k: (thread_id if v == "THREAD" else v) for k, v in params.items()}
                    result = await rpc.result(method, given)
                    jsonschema.validate(result, response_schema(schema_dir, method))
                    if method == "thread/start":
                        thread_id = result["thread"]["id"]
                        assert result["model"] == "contract-model"
                        assert result["modelProvider"] == "gw"
                    if method == "turn/start":
                        # Only to end the turn: one that already ended on its own (its model
                        # is unreachable; a busy machine is slow to interrupt) is as good.
                        turn_id = result["turn"]["id"]
                        answer = await rpc.call(
                            "turn/interrupt", {"threadId": thread_id, "turnId": turn_id}
                        )
                        if "error" in answer:
                            assert "no active turn" in answer["error"]["message"], answer


async def test_a_client_close_code_is_answered_and_sigterm_ends_the_server(
    codex: Path, tmp_path: Path
) -> None:
    async with serving(codex, tmp_path / "home", *AUTH_ARGS) as server:
        with trio.fail_after(30):
            async with client(server) as rpc:
                await rpc.ws.aclose(4005, "client leaving")
                # Checked with 0.169.0: the server answers a client's close with 1000, whatever
                # code the client sent.
                assert rpc.ws.closed is not None and rpc.ws.closed.code == 1000
            async with client(server) as rpc:
                server.proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await rpc.ws.get_message()
                reason = closed.value.reason
                assert reason is not None and reason.code in (1000, 1001, 1006), reason
            assert await server.proc.wait() == 0
