"""Executors through the whole gateway: the session's codex runs a shell call on an executor.

The gateway asks the (fake) exec gateway for the workspace's executors at spawn, mints a cap
token per executor and renders ``[mcp_servers.<exe>]`` entries that run its own ``env-mcp``.
The real codex child, told by the fake model server to call ``mcp__exe_alpha`` ``shell``,
spawns ``env-mcp``, which reaches a real ``codex exec-server`` through the fake exec gateway.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import trio

from gateway_tests.executor_fixtures import (
    API_KEY,
    CAP_SECRET,
    TURN_TIMEOUT,
    WORKSPACE,
    assert_first_request_offers,
    shell_call,
    tool_output_seen_by_model,
)
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway
from gateway_tests.fakes.fake_model_server import FakeModelServer, TextReply
from gateway_tests.harness import LaunchGateway, Rpc, closed_port, connect


def _model_vars(model_server: FakeModelServer) -> dict[str, str]:
    """The real codex child's model: the fake model server, with the key it accepts."""
    return {
        "CXG_MODEL_PROVIDER_BASE_URL": f"{model_server.base_url}/v1",
        "CXG_CODEX_API_KEY": API_KEY,
        "CXG_MODEL": "gateway-test-model",
        "CXG_CHILD_READY_TIMEOUT": "60s",
    }


def _exec_vars(gateway: FakeExecGateway) -> dict[str, str]:
    return {
        "CXG_EXEC_GATEWAY_URL": gateway.ws_url,
        "CXG_EXEC_GATEWAY_INTERNAL_URL": gateway.base_url,
        "CXG_EXEC_GATEWAY_INTERNAL_SECRET": gateway.internal_secret,
        "CXG_CAPTOKEN_HMAC_SECRET": CAP_SECRET.decode(),
    }


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


async def test_session_codex_runs_echo_hello_on_the_workspace_executor(
    launch_gateway: LaunchGateway,
    real_codex_bin: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    model.script.append(shell_call(["echo", "hello"]))
    model.script.append(TextReply("The command ran."))
    gateway = await launch_gateway(real_codex_bin, **_model_vars(model), **_exec_vars(exec_gateway))
    with trio.fail_after(TURN_TIMEOUT):
        async with connect(gateway, WORKSPACE) as rpc:
            turn = await _turn(rpc, "Say hello on the executor.")
    assert turn["status"] == "completed"
    # The first model request of the thread already offered the executor.
    assert_first_request_offers(model, "mcp__exe_alpha")
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
    port = await closed_port()
    down = {
        "CXG_EXEC_GATEWAY_URL": f"ws://127.0.0.1:{port}",
        "CXG_EXEC_GATEWAY_INTERNAL_URL": f"http://127.0.0.1:{port}",
        "CXG_EXEC_GATEWAY_INTERNAL_SECRET": "in-s3cret",
        "CXG_CAPTOKEN_HMAC_SECRET": CAP_SECRET.decode(),
    }
    model.script.append(TextReply("Plain chat works."))
    gateway = await launch_gateway(real_codex_bin, **_model_vars(model), **down)
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
