"""env-mcp driven as codex drives it: a child on stdio, a fake exec gateway, a real exec-server.

The fake exec gateway verifies the capability token (executor and workspace) and relays the
bridge to a real ``codex exec-server --listen ws://127.0.0.1:0``, so the shell tool's protocol is
checked against the pinned exec-server itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.envmcp import main as envmcp_main
from gateway.envmcp.specs import EXECUTOR_TOOLS
from gateway_tests.envmcp_stdio import (
    CAP_SECRET,
    NOT_IMPORTED_AT_START,
    PROTOCOL_VERSION,
    TOKEN_ENV,
    McpStdioClient,
    envmcp_command,
    result_text,
    running_envmcp,
    token_for,
)
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway, run_exec_server

TOOL_NAMES = [spec.name for spec in EXECUTOR_TOOLS]


@pytest.fixture
async def exec_server_url(real_codex_bin: Path, tmp_path: Path) -> AsyncIterator[str]:
    """A real ``codex exec-server`` on loopback: the executor."""
    home = tmp_path / "executor-home"
    home.mkdir()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_exec_server, real_codex_bin, home)
        yield url
        nursery.cancel_scope.cancel()


@pytest.fixture
async def exec_gateway(exec_server_url: str) -> AsyncIterator[FakeExecGateway]:
    """The fake exec gateway: exe_alpha and exe_beta in ws_a, exe_gamma in ws_b."""
    gateway = FakeExecGateway(internal_secret="in-s3cret", captoken_secret=CAP_SECRET)
    gateway.add_executor("exe_alpha", workspace_id="ws_a", backend_url=exec_server_url)
    gateway.add_executor("exe_beta", workspace_id="ws_a", backend_url=exec_server_url)
    gateway.add_executor("exe_gamma", workspace_id="ws_b", backend_url=exec_server_url)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        yield gateway
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def alpha_envmcp(
    gateway: FakeExecGateway, token: str | None = None, *extra: str
) -> AsyncIterator[McpStdioClient]:
    """env-mcp for exe_alpha, initialised, with ``token`` (default: a valid one)."""
    command = envmcp_command(
        "exe_alpha",
        f"{gateway.ws_url}/bridge/exe_alpha",
        TOKEN_ENV,
        "--turn-id",
        "trn_test0001",
        *extra,
    )
    env = {TOKEN_ENV: token_for() if token is None else token}
    async with running_envmcp(command, env) as client:
        with trio.fail_after(30):
            await client.initialize()
        yield client


async def test_echo_hello_comes_back_with_exit_code_zero(exec_gateway: FakeExecGateway) -> None:
    token = token_for()
    async with alpha_envmcp(exec_gateway, token) as client:
        with trio.fail_after(30):
            result = await client.call_shell(["echo", "hello"])
    assert result["isError"] is False
    assert result_text(result) == "hello\n[exit_code=0]"
    attempt = exec_gateway.bridge_attempts[-1]
    assert (attempt.exe_id, attempt.status) == ("exe_alpha", 101)
    assert attempt.authorization == f"Bearer {token}"


async def test_non_zero_exit_is_an_error_with_stdout_and_stderr(
    exec_gateway: FakeExecGateway,
) -> None:
    async with alpha_envmcp(exec_gateway) as client:
        with trio.fail_after(30):
            result = await client.call_shell(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert result["isError"] is True
    assert result_text(result) == "out\n--- stderr ---\nerr\n[exit_code=3]"


async def test_a_command_that_cannot_start_is_an_error(exec_gateway: FakeExecGateway) -> None:
    async with alpha_envmcp(exec_gateway) as client:
        with trio.fail_after(30):
            result = await client.call_shell(["/nonexistent/binary"])
    assert result["isError"] is True
    assert "/nonexistent/binary" in result_text(result) or "exec failed" in result_text(result)


async def test_cwd_is_honoured_absolute_and_relative(
    exec_gateway: FakeExecGateway, tmp_path: Path
) -> None:
    (tmp_path / "sub dir").mkdir()
    async with alpha_envmcp(exec_gateway) as client:
        with trio.fail_after(30):
            absolute = await client.call_shell(["pwd"], cwd=str(tmp_path / "sub dir"))
            relative = await client.call_shell(["pwd"], cwd="..", **{})
            default = await client.call_shell(["pwd"])
    assert result_text(absolute) == f"{tmp_path / 'sub dir'}\n[exit_code=0]"
    default_dir = result_text(default).split("\n")[0]
    assert result_text(relative).split("\n")[0] == str(Path(default_dir).parent)


async def test_environment_is_the_executors_core_environment(
    exec_gateway: FakeExecGateway,
) -> None:
    async with alpha_envmcp(exec_gateway) as client:
        with trio.fail_after(30):
            result = await client.call_shell(["sh", "-c", 'echo "path=$PATH"; env'])
    text = result_text(result)
    assert result["isError"] is False
    assert "path=/" in text  # commands are found on the executor's PATH
    assert TOKEN_ENV not in text  # env-mcp's own token never reaches the command


async def test_stdin_reads_as_empty(exec_gateway: FakeExecGateway) -> None:
    async with alpha_envmcp(exec_gateway) as client:
        with trio.fail_after(30):
            result = await client.call_shell(["cat"])
    assert result_text(result) == "[exit_code=0]"


async def test_time_limit_kills_the_remote_process(
    exec_gateway: FakeExecGateway, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    script = f'echo started; echo $$ > "{pid_file}"; exec sleep 300'
    async with alpha_envmcp(exec_gateway, None, "--timeout", "2") as client:
        with trio.fail_after(30):
            result = await client.call_shell(["sh", "-c", script])
    assert result["isError"] is True
    text = result_text(result)
    assert text.startswith("started\n")
    assert "[time limit of 2s reached; the process was killed]" in text
    pid = int(pid_file.read_text())
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone and reaped
    try:
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(pidfd)  # readable once the process has exited
    finally:
        os.close(pidfd)


async def test_large_output_is_collected_completely(exec_gateway: FakeExecGateway) -> None:
    # Several process/read rounds: nothing may be lost between them.
    script = "for i in $(seq 1 3000); do echo line-$i; done"
    async with alpha_envmcp(exec_gateway) as client:
        with trio.fail_after(60):
            result = await client.call_shell(["sh", "-c", script])
    lines = result_text(result).split("\n")
    assert lines[:-1] == [f"line-{i}" for i in range(1, 3001)]
    assert lines[-1] == "[exit_code=0]"


async def test_fast_commands_never_lose_their_output(exec_gateway: FakeExecGateway) -> None:
    # The exit may be reported before the output; the answer must wait for the output.
    async with alpha_envmcp(exec_gateway) as client:
        with trio.fail_after(60):
            for n in range(15):
                result = await client.call_shell(["echo", f"run-{n}"])
                assert result_text(result) == f"run-{n}\n[exit_code=0]"


async def test_a_background_child_holding_the_pipes_does_not_hold_the_answer(
    exec_gateway: FakeExecGateway,
) -> None:
    async with alpha_envmcp(exec_gateway) as client:
        with trio.fail_after(10):
            result = await client.call_shell(["sh", "-c", "sleep 3 & echo bg"])
    assert result_text(result) == "bg\n[exit_code=0]"


async def test_slow_output_is_collected_across_reads(exec_gateway: FakeExecGateway) -> None:
    script = "for i in 1 2 3 4 5; do echo $i; sleep 0.1; done"
    async with alpha_envmcp(exec_gateway) as client:
        with trio.fail_after(30):
            result = await client.call_shell(["sh", "-c", script])
    assert result_text(result) == "1\n2\n3\n4\n5\n[exit_code=0]"


async def test_concurrent_calls_are_independent(exec_gateway: FakeExecGateway) -> None:
    results: dict[str, dict[str, Any]] = {}
    async with alpha_envmcp(exec_gateway) as client:
        ids = [await _send_call(client, ["sh", "-c", f"sleep 0.3; echo {n}"]) for n in "abc"]
        with trio.fail_after(30):
            while len(results) < 3:
                message = await client._next_message()
                if message.get("id") in ids:
                    results[message["id"]] = message["result"]
    texts = sorted(result_text(r) for r in results.values())
    assert texts == ["a\n[exit_code=0]", "b\n[exit_code=0]", "c\n[exit_code=0]"]


async def _send_call(client: McpStdioClient, command: list[str]) -> int:
    request_id = next(client._ids)
    await client.send(
        {
            "id": request_id,
            "method": "tools/call",
            "params": {"name": "shell", "arguments": {"command": command}},
        }
    )
    return request_id


async def test_cancelled_call_kills_the_remote_process(
    exec_gateway: FakeExecGateway, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    script = f'echo $$ > "{pid_file}.tmp"; mv "{pid_file}.tmp" "{pid_file}"; exec sleep 300'
    async with alpha_envmcp(exec_gateway) as client:
        request_id = await _send_call(client, ["sh", "-c", script])
        with trio.fail_after(30):
            # Wait for the process to exist: its pid file appears (watched via a second call).
            probe = await client.call_shell(
                ["sh", "-c", f'while [ ! -s "{pid_file}" ]; do sleep 0.05; done; cat "{pid_file}"']
            )
        pid = int(result_text(probe).split("\n")[0])
        pidfd = os.pidfd_open(pid)
        try:
            await client.notify(
                "notifications/cancelled", {"requestId": request_id, "reason": "test"}
            )
            with trio.fail_after(15):
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)


@pytest.mark.parametrize(
    ("token", "status", "reason"),
    [
        (lambda: token_for(exe_id="exe_beta"), 403, "exe_id not in token allow set"),
        (lambda: token_for(workspace_id="ws_b"), 403, "exe_id not in token workspace"),
        (lambda: token_for(ttl=-1), 401, "capability token expired"),
        (lambda: token_for(secret=b"not-the-secret"), 401, "bad capability token signature"),
        (lambda: "garbage", 401, "malformed capability token"),
    ],
    ids=["other-executor", "other-workspace", "expired", "bad-signature", "malformed"],
)
async def test_refused_tokens_give_a_clear_tool_error_quickly(
    exec_gateway: FakeExecGateway, token: Any, status: int, reason: str
) -> None:
    async with alpha_envmcp(exec_gateway, token()) as client:
        with trio.fail_after(10):
            result = await client.call_shell(["echo", "hello"])
    assert result["isError"] is True
    text = result_text(result)
    assert f"HTTP {status}" in text
    assert reason in text
    assert "hello" not in text
    assert exec_gateway.bridge_attempts[-1].status == status


async def test_executor_not_connected_is_a_clear_tool_error(
    exec_gateway: FakeExecGateway,
) -> None:
    exec_gateway.executors["exe_alpha"].connected = False
    async with alpha_envmcp(exec_gateway) as client:
        with trio.fail_after(10):
            result = await client.call_shell(["echo", "hello"])
    assert result["isError"] is True
    assert "HTTP 503" in result_text(result)
    assert "executor not connected" in result_text(result)


async def test_unreachable_bridge_is_a_clear_tool_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/bridge/exe_alpha"
        command = envmcp_command("exe_alpha", url, TOKEN_ENV)
        async with running_envmcp(command, {TOKEN_ENV: "tok"}) as client:
            with trio.fail_after(30):
                await client.initialize()
                result = await client.call_shell(["echo", "hello"])
    assert result["isError"] is True
    assert "could not reach the bridge" in result_text(result)


async def test_tools_list_is_answered_without_importing_the_bridge(tmp_path: Path) -> None:
    # The gateway's own self command (gateway.daemon.self_command) plus -X importtime.
    command = [sys.executable, "-X", "importtime", "-m", "gateway", "env-mcp"]
    command += envmcp_command("exe_alpha", "ws://127.0.0.1:9/bridge/exe_alpha", TOKEN_ENV)[3:]
    stderr_path = tmp_path / "importtime.txt"
    with stderr_path.open("wb") as stderr:
        async with running_envmcp(command, {TOKEN_ENV: "tok"}, stderr=stderr) as client:
            with trio.fail_after(60):
                await client.initialize()
                tools = await client.request("tools/list")
    assert [tool["name"] for tool in tools["result"]["tools"]] == TOOL_NAMES
    lines = stderr_path.read_text().splitlines()
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in lines
        if line.startswith("import time:") and "|" in line
    }
    assert "gateway.envmcp.server" in imported  # the check reads the right output
    for module in NOT_IMPORTED_AT_START:
        early = sorted(name for name in imported if name == module or name.startswith(module + "."))
        assert early == [], f"{module} imported before the first tool call"


async def test_mcp_surface_lists_the_tools_and_no_prompts_or_resources(
    exec_gateway: FakeExecGateway,
) -> None:
    command = envmcp_command(
        "exe_alpha",
        f"{exec_gateway.ws_url}/bridge/exe_alpha",
        TOKEN_ENV,
        "--exe-desc",
        "Daisy's MacBook",
    )
    async with running_envmcp(command, {TOKEN_ENV: token_for()}) as client:
        with trio.fail_after(30):
            init = await client.initialize()
            tools = await client.request("tools/list")
            prompts = await client.request("prompts/list")
            resources = await client.request("resources/list")
            templates = await client.request("resources/templates/list")
            ping = await client.request("ping")
            unknown = await client.request("tools/call", {"name": "rm", "arguments": {}})
            bad = await client.request("tools/call", {"name": "shell", "arguments": {}})
            stringly = await client.request(
                "tools/call", {"name": "shell", "arguments": {"command": "ls -la"}}
            )
    assert init["result"]["protocolVersion"] == PROTOCOL_VERSION
    assert init["result"]["serverInfo"]["name"] == "codex-env-mcp"
    assert "tools" in init["result"]["capabilities"]
    tool, *others = tools["result"]["tools"]
    assert tool["name"] == "shell"
    assert [t["name"] for t in others] == TOOL_NAMES[1:]
    assert all("Daisy's MacBook" in t["description"] for t in others)
    assert "Daisy's MacBook" in tool["description"]
    assert tool["inputSchema"]["required"] == ["command"]
    assert tool["inputSchema"]["properties"]["command"]["type"] == "array"
    assert prompts["result"] == {"prompts": []}
    assert resources["result"] == {"resources": []}
    assert templates["result"] == {"resourceTemplates": []}
    assert ping["result"] == {}
    assert unknown["error"]["code"] == -32601
    assert "unknown tool: rm" in unknown["error"]["message"]
    assert bad["result"]["isError"] is True
    assert "command must be a non-empty array" in result_text(bad["result"])
    assert stringly["result"]["isError"] is True
    assert "not a string" in result_text(stringly["result"])
    # Listing and refusing touched no bridge.
    assert exec_gateway.bridge_attempts == []


async def test_an_unknown_protocol_version_is_negotiated(exec_gateway: FakeExecGateway) -> None:
    command = envmcp_command("exe_alpha", f"{exec_gateway.ws_url}/bridge/exe_alpha", TOKEN_ENV)
    async with running_envmcp(command, {TOKEN_ENV: token_for()}) as client:
        with trio.fail_after(30):
            answer = await client.request(
                "initialize",
                {
                    "protocolVersion": "1999-01-01",
                    "capabilities": {},
                    "clientInfo": {"name": "old", "version": "0"},
                },
            )
    assert answer["result"]["protocolVersion"] != "1999-01-01"


async def test_stdin_closing_is_a_clean_exit(exec_gateway: FakeExecGateway) -> None:
    command = envmcp_command("exe_alpha", f"{exec_gateway.ws_url}/bridge/exe_alpha", TOKEN_ENV)
    async with running_envmcp(command, {TOKEN_ENV: token_for()}) as client:
        with trio.fail_after(30):
            await client.initialize()
        process = client.process
    assert process.returncode == 0


async def test_empty_token_exits_1_with_a_clear_message() -> None:
    command = envmcp_command("exe_alpha", "ws://127.0.0.1:1/bridge/exe_alpha", "CXG_EMPTY_TOKEN")
    env = {k: v for k, v in os.environ.items() if k != "CXG_EMPTY_TOKEN"}
    with trio.fail_after(30):
        done = await trio.run_process(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 1
    assert done.stdout == b""
    assert b"env var CXG_EMPTY_TOKEN is empty; cannot authenticate to bridge" in done.stderr


REQUIRED = ["--exe-id", "e", "--bridge-url", "ws://gw/bridge/e", "--token-env", "T"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (REQUIRED[2:], "--exe-id"),
        (REQUIRED[:2] + REQUIRED[4:], "--bridge-url"),
        (REQUIRED[:4], "--token-env"),
        ([*REQUIRED[:3], "http://gw/bridge/e", *REQUIRED[4:]], "must be a ws:// or wss:// URL"),
        (["--exe-id", "", *REQUIRED[2:]], "must not be empty"),
        ([*REQUIRED, "--bogus"], "--bogus"),
        ([*REQUIRED, "extra"], "unrecognized arguments: extra"),
        ([*REQUIRED, "--timeout", "0"], "positive number of seconds"),
        ([*REQUIRED, "--timeout", "soon"], "positive number of seconds"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        envmcp_main(argv)
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("codex-app-gateway env-mcp: ")
    assert message in lines[0]


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        envmcp_main(["--help"])
    assert caught.value.code == 0
    assert "--exe-id" in capsys.readouterr().out


def test_register_adds_the_subcommand() -> None:
    import argparse

    from gateway.envmcp import register, run

    parser = argparse.ArgumentParser(prog="codex-app-gateway")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["env-mcp", *REQUIRED, "--exe-desc", "Mac", "--turn-id", "trn_1"])
    assert (args.exe_id, args.bridge_url, args.token_env) == ("e", "ws://gw/bridge/e", "T")
    assert (args.exe_desc, args.turn_id, args.timeout) == ("Mac", "trn_1", 50.0)
    assert args.handler is run
