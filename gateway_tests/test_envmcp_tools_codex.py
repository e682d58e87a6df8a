"""The executor tools as the real codex app-server calls them, from a scripted model's turn.

codex spawns env-mcp from the rendered ``[mcp_servers.exe_alpha]`` entry; the fake model asks
for ``read_file``, ``apply_patch`` and ``exec_command``/``write_stdin`` in one turn; env-mcp
runs them on a real exec-server behind the fake exec gateway. The tools' schemas must be
accepted by codex and their results must come back to the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import trio
import trio_websocket

from gateway.codex_home.config_toml import CodexConfig, ModelProvider, render_config_toml
from gateway.executors import executor_mcp_servers
from gateway_tests.app_server_turns import SELF_COMMAND, AppServerClient, exec_settings
from gateway_tests.executor_fixtures import API_KEY, TURN_TIMEOUT, WORKSPACE
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway
from gateway_tests.fakes.fake_model_server import (
    FakeModelServer,
    FunctionCallReply,
    TextReply,
    function_call_outputs,
    output_text,
)
from gateway_tests.real_app_server import run_app_server


def _outputs_by_call(model: FakeModelServer) -> dict[str, str]:
    return {
        item["call_id"]: output_text(item)
        for request in model.responses_requests()
        for item in function_call_outputs(request.body)
    }


async def test_codex_reads_patches_and_drives_a_session_on_the_executor(
    real_codex_bin: Path,
    tmp_path: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    target = tmp_path / "project" / "greet.py"
    target.parent.mkdir()
    target.write_text('def greet():\n    print("Hi")\n')
    patch = (
        f"*** Begin Patch\n*** Update File: {target}\n@@ def greet():\n"
        '-    print("Hi")\n+    print("Hello")\n*** End Patch'
    )
    calls: list[tuple[str, dict[str, Any]]] = [
        ("read_file", {"path": str(target)}),
        ("apply_patch", {"input": patch}),
        ("exec_command", {"cmd": "read x; echo got:$x", "workdir": str(target.parent)}),
        ("write_stdin", {"session_id": 1, "chars": "hi\n", "yield_time_ms": 5000}),
    ]
    for n, (name, arguments) in enumerate(calls):
        model.script.append(
            FunctionCallReply(
                namespace="mcp__exe_alpha", name=name, arguments=arguments, call_id=f"call_{n}"
            )
        )
    model.script.append(TextReply("Done."))

    async with httpx2.AsyncClient() as http:
        servers = await executor_mcp_servers(
            exec_settings(exec_gateway), http, WORKSPACE, SELF_COMMAND
        )
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    config = CodexConfig(
        model="gpt-5.5",
        provider=ModelProvider(id="fake", base_url=f"{model.base_url}/v1", env_key="CODEX_API_KEY"),
        trusted_paths=(str(codex_home),),
        mcp_servers=servers,
    )
    (codex_home / "config.toml").write_text(render_config_toml(config))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            run_app_server, real_codex_bin, codex_home, {"CODEX_API_KEY": API_KEY}
        )
        async with trio_websocket.open_websocket_url(
            server.url, max_message_size=64 * 1024 * 1024
        ) as ws:
            with trio.fail_after(TURN_TIMEOUT):
                turn, _ = await AppServerClient(ws).run_turn("Fix the greeting.")
        nursery.cancel_scope.cancel()

    assert turn["status"] == "completed", turn
    outputs = _outputs_by_call(model)
    assert set(outputs) == {f"call_{n}" for n in range(len(calls))}, outputs
    assert 'L2:     print("Hi")' in outputs["call_0"]
    assert f"M {target}" in outputs["call_1"]
    assert "[session 1 is running" in outputs["call_2"]
    assert "got:hi" in outputs["call_3"]
    assert "[session 1 ended]" in outputs["call_3"]
    assert target.read_text() == 'def greet():\n    print("Hello")\n'
