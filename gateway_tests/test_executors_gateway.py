"""Executors through the whole gateway: the session's codex runs a shell call on an executor.

In both layouts (``CXG_EXECUTOR_MCP_LAYOUT``): multiplexed, one ``[mcp_servers.executors]``
env-mcp that asks the session for a token per call; per-executor, the gateway asks the (fake)
exec gateway at spawn, mints a cap token per executor and renders ``[mcp_servers.<exe>]``
entries. The real codex child, told by the fake model server to call ``shell``, spawns
``env-mcp``, which reaches a real ``codex exec-server`` through the fake exec gateway.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway_tests.executor_fixtures import (
    CAP_SECRET,
    TURN_TIMEOUT,
    WORKSPACE,
    assert_first_request_offers,
    exec_vars,
    model_vars,
    shell_call,
    tool_output_seen_by_model,
)
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway
from gateway_tests.fakes.fake_model_server import FakeModelServer, FunctionCallReply, TextReply
from gateway_tests.harness import LaunchGateway, Rpc, closed_port, connect


async def _turn(rpc: Rpc, text: str) -> dict[str, Any]:
    """A thread and one turn started straight after it, as a user who types at once."""
    thread = await rpc.result("thread/start", {})
    started = await rpc.result(
        "turn/start",
        {"threadId": thread["thread"]["id"], "input": [{"type": "text", "text": text}]},
    )
    turn_id = started["turn"]["id"]
    completed = await rpc.wait_for("turn/completed", lambda m: m["params"]["turn"]["id"] == turn_id)
    turn: dict[str, Any] = completed["params"]["turn"]
    return turn


LAYOUTS = [
    pytest.param(
        "multiplexed", "mcp__executors", {"environment_id": "exe_alpha"}, id="multiplexed"
    ),
    pytest.param("per-executor", "mcp__exe_alpha", {}, id="per-executor"),
]


@pytest.mark.parametrize(("layout", "namespace", "target"), LAYOUTS)
async def test_session_codex_runs_echo_hello_on_the_workspace_executor(
    launch_gateway: LaunchGateway,
    real_codex_bin: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
    layout: str,
    namespace: str,
    target: dict[str, str],
) -> None:
    model.script.append(shell_call(["echo", "hello"], namespace=namespace, target=target))
    model.script.append(TextReply("The command ran."))
    gateway = await launch_gateway(
        real_codex_bin,
        **model_vars(model),
        **exec_vars(exec_gateway),
        CXG_EXECUTOR_MCP_LAYOUT=layout,
    )
    with trio.fail_after(TURN_TIMEOUT):
        async with connect(gateway, WORKSPACE) as rpc:
            turn = await _turn(rpc, "Say hello on the executor.")
    assert turn["status"] == "completed"
    # The first model request of the thread already offered the executor.
    assert_first_request_offers(model, namespace)
    # env-mcp dialled the bridge with a cap token the exec gateway accepted...
    assert [a.status for a in exec_gateway.bridge_attempts] == [101]
    # ...and the executor's answer reached the model in the next request.
    output = tool_output_seen_by_model(model)
    assert "hello" in output
    assert "[exit_code=0]" in output


async def test_exec_gateway_down_at_spawn_gives_no_executors_and_chat_still_works(
    launch_gateway: LaunchGateway,
    tmp_path: Path,
    real_codex_bin: Path,
    model: FakeModelServer,
) -> None:
    # The per-executor layout asks at spawn; the multiplexed one asks at each call (below).
    port = await closed_port()
    down = {
        "CXG_EXEC_GATEWAY_URL": f"ws://127.0.0.1:{port}",
        "CXG_EXEC_GATEWAY_INTERNAL_URL": f"http://127.0.0.1:{port}",
        "CXG_EXEC_GATEWAY_INTERNAL_SECRET": "in-s3cret",
        "CXG_CAPTOKEN_HMAC_SECRET": CAP_SECRET.decode(),
        "CXG_EXECUTOR_MCP_LAYOUT": "per-executor",
    }
    model.script.append(TextReply("Plain chat works."))
    gateway = await launch_gateway(real_codex_bin, **model_vars(model), **down)
    with trio.fail_after(TURN_TIMEOUT):
        async with connect(gateway, "ws_noexec") as rpc:
            turn = await _turn(rpc, "Just chat.")
            config = tomllib.loads(
                (tmp_path / "sessions" / "ws_noexec" / "codex-home" / "config.toml").read_text()
            )
    assert turn["status"] == "completed"
    assert "mcp_servers" not in config
    assert config["features"]["shell_tool"] is False
    assert model.responses_requests(), "the turn never reached the model"


async def test_exec_gateway_down_is_a_clear_tool_error_and_chat_still_works(
    launch_gateway: LaunchGateway,
    real_codex_bin: Path,
    model: FakeModelServer,
) -> None:
    port = await closed_port()
    down = {
        "CXG_EXEC_GATEWAY_URL": f"ws://127.0.0.1:{port}",
        "CXG_EXEC_GATEWAY_INTERNAL_URL": f"http://127.0.0.1:{port}",
        "CXG_EXEC_GATEWAY_INTERNAL_SECRET": "in-s3cret",
        "CXG_CAPTOKEN_HMAC_SECRET": CAP_SECRET.decode(),
    }
    model.script.append(
        FunctionCallReply(
            namespace="mcp__executors",
            name="list_environments",
            arguments={},
            call_id="call_shell_1",
        )
    )
    model.script.append(TextReply("No executors right now."))
    gateway = await launch_gateway(real_codex_bin, **model_vars(model), **down)
    with trio.fail_after(TURN_TIMEOUT):
        async with connect(gateway, "ws_noexec") as rpc:
            turn = await _turn(rpc, "Which executors are there?")
    assert turn["status"] == "completed"
    output = tool_output_seen_by_model(model)
    assert "cannot list environments" in output
    assert "exec gateway could not be asked" in output
