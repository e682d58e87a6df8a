"""Executors end to end with real parts: the real codex app-server runs a shell tool call.

The test plays the gateway's part at spawn: it asks the (fake) exec gateway which executors the
workspace has, renders config.toml with ``executor_mcp_servers``' entries, and starts the real
``codex app-server``. The fake model server tells codex to call ``mcp__exe_alpha`` ``shell``
with ``["echo", "hello"]``; codex spawns ``env-mcp``, which dials the fake exec gateway's
bridge with its capability token; the fake verifies it and relays to a real ``codex
exec-server``. The tool's output must come back to the model and the turn must complete.

Each turn starts straight after ``thread/start``, as a user who types at once: the thread's
first model request must already offer the executor (codex-protocol.md §12).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import httpx2
import trio
import trio_websocket

from gateway.clients.execgateway import ConnectedExecutor
from gateway.codex_home.config_toml import CodexConfig, McpServer, ModelProvider, render_config_toml
from gateway.executors import executor_mcp_servers, executor_servers_for
from gateway_tests.app_server_turns import SELF_COMMAND, AppServerClient, exec_settings
from gateway_tests.executor_fixtures import (
    API_KEY,
    TURN_TIMEOUT,
    WORKSPACE,
    assert_first_request_offers,
    shell_call,
    tool_output_seen_by_model,
)
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway
from gateway_tests.fakes.fake_model_server import (
    FakeModelServer,
    TextReply,
    announced_mcp_namespaces,
)
from gateway_tests.real_app_server import run_app_server

_BANNER = re.compile(rb"listening on:\s*(ws://[0-9.]+:\d+)")


async def workspace_servers(gateway: FakeExecGateway) -> tuple[McpServer, ...]:
    """The ``[mcp_servers]`` entries the gateway renders for WORKSPACE's executors at spawn."""
    async with httpx2.AsyncClient() as http:
        return await executor_mcp_servers(exec_settings(gateway), http, WORKSPACE, SELF_COMMAND)


async def run_turn_with_servers(
    real_codex_bin: Path,
    tmp_path: Path,
    model: FakeModelServer,
    servers: tuple[McpServer, ...],
    command: list[str] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Render config.toml with ``servers``, script the tool call (if any), and run one turn."""
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    config = CodexConfig(
        model="gpt-5.5",
        provider=ModelProvider(id="fake", base_url=f"{model.base_url}/v1", env_key="CODEX_API_KEY"),
        trusted_paths=(str(codex_home),),
        mcp_servers=servers,
    )
    (codex_home / "config.toml").write_text(render_config_toml(config))
    if command is not None:
        model.script.append(shell_call(command))
    model.script.append(TextReply("The command ran." if command else "Plain chat."))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            run_app_server, real_codex_bin, codex_home, {"CODEX_API_KEY": API_KEY}
        )
        async with trio_websocket.open_websocket_url(
            server.url, max_message_size=64 * 1024 * 1024
        ) as ws:
            with trio.fail_after(TURN_TIMEOUT):
                result = await AppServerClient(ws).run_turn("Say hello on the executor.")
        nursery.cancel_scope.cancel()
    return result


async def test_real_codex_runs_echo_hello_on_the_executor(
    real_codex_bin: Path,
    tmp_path: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    servers = await workspace_servers(exec_gateway)
    assert [s.name for s in servers] == ["exe_alpha"]

    turn, notifications = await run_turn_with_servers(
        real_codex_bin, tmp_path, model, servers, ["echo", "hello"]
    )

    assert turn["status"] == "completed", turn
    # The turn started at once, and its first model request already offered the executor.
    assert_first_request_offers(model, "mcp__exe_alpha")
    # env-mcp dialled the bridge with a token the exec gateway accepted...
    assert [a.status for a in exec_gateway.bridge_attempts] == [101]
    # ...and hello came back to the model in the next request.
    text = tool_output_seen_by_model(model)
    assert "hello" in text
    assert "[exit_code=0]" in text
    assert len(model.responses_requests()) == 2
    mcp_items = [
        n["params"]["item"]
        for n in notifications
        if n.get("method") == "item/completed" and n["params"]["item"].get("type") == "mcpToolCall"
    ]
    assert mcp_items and mcp_items[0].get("server") == "exe_alpha"


def _started_through(shell_script: str, server: McpServer, **changes: Any) -> McpServer:
    """``server`` run through ``sh -c shell_script`` (which gets the original argv as "$@")."""
    return attrs.evolve(
        server,
        command="/bin/sh",
        args=("-c", shell_script, server.command, *server.args),
        **changes,
    )


async def test_an_executor_slower_than_codexs_default_grace_is_in_the_first_request(
    real_codex_bin: Path,
    tmp_path: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    # env-mcp answering tools/list 2.5 s after spawn: codex's default grace (1000 ms) would leave
    # it out of the first request; the rendered grace of 0 makes codex wait for it.
    (server,) = await workspace_servers(exec_gateway)
    slow = _started_through('sleep 2.5; exec "$0" "$@"', server)

    turn, _ = await run_turn_with_servers(real_codex_bin, tmp_path, model, (slow,), ["true"])

    assert turn["status"] == "completed", turn
    assert_first_request_offers(model, "mcp__exe_alpha")
    assert [a.status for a in exec_gateway.bridge_attempts] == [101]


async def test_a_hung_executor_delays_the_first_turn_only_by_its_startup_timeout(
    real_codex_bin: Path,
    tmp_path: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    # A server that never answers initialize: it reads stdin until codex closes it, and keeps
    # its stdout open (a closed one is a crash, which costs codex nothing).
    (server,) = await workspace_servers(exec_gateway)
    script = """exec "$0" -c 'import sys; sys.stdin.buffer.read()'"""
    hung = _started_through(script, server, startup_timeout_sec=3.0)

    started = trio.current_time()
    turn, notifications = await run_turn_with_servers(
        real_codex_bin, tmp_path, model, (hung,), None
    )
    elapsed = trio.current_time() - started

    assert turn["status"] == "completed", turn
    offered = announced_mcp_namespaces(model.responses_requests()[0].body)
    assert "mcp__exe_alpha" not in offered
    statuses = [
        n["params"]["status"]
        for n in notifications
        if n.get("method") == "mcpServer/startupStatus/updated"
    ]
    assert statuses[-1] == "failed", statuses
    # Held for the entry's 3 s, not codex's 30 s default (spawn and turn take a few seconds).
    assert 3.0 <= elapsed < 20.0, elapsed


async def test_a_refused_token_reaches_the_model_as_a_tool_error(
    real_codex_bin: Path,
    tmp_path: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    # A token minted for another workspace: the exec gateway refuses the bridge with 403.
    servers = executor_servers_for(
        [ConnectedExecutor("exe_alpha")],
        settings=exec_settings(exec_gateway),
        workspace_id="ws_someone_else",
        turn_id="trn_e2e00001",
        self_command=SELF_COMMAND,
    )

    turn, _ = await run_turn_with_servers(
        real_codex_bin, tmp_path, model, servers, ["echo", "hello"]
    )

    assert turn["status"] == "completed", turn
    assert [a.status for a in exec_gateway.bridge_attempts] == [403]
    text = tool_output_seen_by_model(model)
    assert "HTTP 403" in text
    assert "exe_id not in token workspace" in text
