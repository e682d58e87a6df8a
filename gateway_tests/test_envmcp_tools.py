"""The executor tools end to end: env-mcp on stdio, the fake exec gateway, a real exec-server.

As in ``test_envmcp``: the fake exec gateway verifies the capability token and relays the bridge
to a real ``codex exec-server``, here one this module starts itself (in its own working
directory under ``tmp_path``) so that a test can kill it mid-call — the executor disconnecting.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from gateway_tests.envmcp_channel_harness import channel_envmcp, served_channel
from gateway_tests.envmcp_stdio import (
    CAP_SECRET,
    TOKEN_ENV,
    McpStdioClient,
    alpha_envmcp,
    envmcp_command,
    result_text,
    running_envmcp,
    token_for,
)
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway

CALL_TIMEOUT = 30


@attrs.define
class Executor:
    """A real exec-server: its URL, its process, its working directory."""

    url: str
    process: trio.Process
    workdir: Path

    def kill(self) -> None:
        self.process.kill()


@pytest.fixture
async def executor(real_codex_bin: Path, tmp_path: Path) -> AsyncIterator[Executor]:
    home = tmp_path / "executor-home"
    workdir = tmp_path / "work"
    home.mkdir()
    workdir.mkdir()
    command = [os.fspath(real_codex_bin), "exec-server", "--listen", "ws://127.0.0.1:0"]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdout=subprocess.PIPE,
                cwd=workdir,
                env={**os.environ, "CODEX_HOME": os.fspath(home)},
                check=False,
            )
        )
        assert process.stdout is not None
        buffer = b""
        with trio.fail_after(30):
            while b"\n" not in buffer:
                chunk = await process.stdout.receive_some()
                assert chunk, f"exec-server exited before printing its URL: {buffer!r}"
                buffer += chunk
        nursery.start_soon(_drain, process.stdout)
        yield Executor(buffer.split(b"\n")[0].decode().strip(), process, workdir)
        nursery.cancel_scope.cancel()


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


@pytest.fixture
async def exec_gateway(executor: Executor) -> AsyncIterator[FakeExecGateway]:
    gateway = FakeExecGateway(internal_secret="in-s3cret", captoken_secret=CAP_SECRET)
    gateway.add_executor("exe_alpha", workspace_id="ws_a", backend_url=executor.url)
    gateway.add_executor("exe_beta", workspace_id="ws_a", backend_url=executor.url)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        yield gateway
        nursery.cancel_scope.cancel()


async def call(
    client: McpStdioClient, name: str, arguments: Mapping[str, Any], **params: Any
) -> dict[str, Any]:
    """Call a tool; fail the test on a JSON-RPC error (tools answer failures as results)."""
    with trio.fail_after(CALL_TIMEOUT):
        answer = await client.request(
            "tools/call", {"name": name, "arguments": dict(arguments), **params}
        )
    assert "result" in answer, answer
    result: dict[str, Any] = answer["result"]
    return result


async def send_call(client: McpStdioClient, name: str, arguments: Mapping[str, Any]) -> int:
    """Send a tool call without waiting for its answer; return its request id."""
    request_id = next(client._ids)
    params = {"name": name, "arguments": dict(arguments), "_meta": {"progressToken": "p"}}
    await client.send({"id": request_id, "method": "tools/call", "params": params})
    return request_id


async def next_message(client: McpStdioClient) -> dict[str, Any]:
    with trio.fail_after(CALL_TIMEOUT):
        return await client._next_message()


async def answer_to(client: McpStdioClient, request_id: int) -> dict[str, Any]:
    while True:
        message = await next_message(client)
        if message.get("id") == request_id and "method" not in message:
            result: dict[str, Any] = message["result"]
            return result


@attrs.define
class ToolClient:
    """env-mcp in one layout: ``call`` adds ``environment_id`` when it is multiplexed."""

    client: McpStdioClient
    environment_id: str | None

    async def call(self, name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        if self.environment_id is not None:
            arguments = {"environment_id": self.environment_id, **arguments}
        return await call(self.client, name, arguments)


@asynccontextmanager
async def tools_envmcp(
    layout: str, gateway: FakeExecGateway, tmp_path: Path
) -> AsyncIterator[ToolClient]:
    """env-mcp for exe_alpha alone (``fixed``), or for workspace ws_a (``multiplexed``)."""
    if layout == "fixed":
        async with alpha_envmcp(gateway) as client:
            yield ToolClient(client, None)
    else:
        async with served_channel(tmp_path, gateway) as path, channel_envmcp(path) as client:
            yield ToolClient(client, "exe_alpha")


# Both layouts: one env-mcp per executor, and one per session whose tools take environment_id.
LAYOUTS = pytest.mark.parametrize("layout", ["fixed", "multiplexed"])


@contextmanager
def processes_reaped(pid_files: list[Path]) -> Iterator[None]:
    """After the test, end any process a test command left behind (they are the test's own)."""
    try:
        yield
    finally:
        for pid_file in pid_files:
            if pid_file.exists() and pid_file.read_text().strip():
                with suppress(ProcessLookupError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)


async def wait_gone(pid: int) -> None:
    """Wait until process ``pid`` has exited (its pidfd becomes readable), at most 15 s."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with trio.fail_after(15):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


# -- shell_command ------------------------------------------------------------------------------


@LAYOUTS
async def test_shell_command_runs_a_script_and_reports_its_exit_code(
    exec_gateway: FakeExecGateway, executor: Executor, tmp_path: Path, layout: str
) -> None:
    (executor.workdir / "sub").mkdir()
    script = "pwd; echo out; echo err >&2; exit 3"
    async with tools_envmcp(layout, exec_gateway, tmp_path) as client:
        failed = await client.call("shell_command", {"command": script, "workdir": "sub"})
        ok = await client.call("shell_command", {"command": "echo $((6 * 7)) | cat"})
    assert failed["isError"] is True
    *lines, closing = result_text(failed).split("\n")
    # stdout and stderr are separate pipes: their lines interleave in no fixed order.
    assert sorted(lines) == sorted([str(executor.workdir / "sub"), "out", "err"])
    assert closing == "[exit_code=3]"
    assert ok["isError"] is False
    assert result_text(ok) == "42\n[exit_code=0]"


async def test_shell_command_streams_output_as_progress(exec_gateway: FakeExecGateway) -> None:
    script = "for i in 1 2 3; do echo tick-$i; sleep 0.2; done"
    async with alpha_envmcp(exec_gateway) as client:
        request_id = await send_call(client, "shell_command", {"command": script})
        progress: list[dict[str, Any]] = []
        while True:
            message = await next_message(client)
            if message.get("method") == "notifications/progress":
                progress.append(message["params"])
            elif message.get("id") == request_id:
                result = message["result"]
                break
    assert result_text(result) == "tick-1\ntick-2\ntick-3\n[exit_code=0]"
    assert len(progress) >= 2, progress  # the ticks came while the command ran
    assert progress[0]["progressToken"] == "p"
    assert "tick-1" in progress[0]["message"]
    assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)


async def test_shell_command_time_limit_kills_the_process(
    exec_gateway: FakeExecGateway, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    script = f"echo started; echo $$ > {pid_file}; exec sleep 300"
    with processes_reaped([pid_file]):
        async with alpha_envmcp(exec_gateway) as client:
            started = trio.current_time()
            result = await call(client, "shell_command", {"command": script, "timeout_ms": 1500})
            elapsed = trio.current_time() - started
        assert result["isError"] is True
        assert result_text(result) == (
            "started\n[time limit of 1.5s reached; the process was killed]"
        )
        assert elapsed < 10
        await wait_gone(int(pid_file.read_text()))


async def test_shell_command_time_limit_is_capped_by_env_mcps_own(
    exec_gateway: FakeExecGateway,
) -> None:
    async with alpha_envmcp(exec_gateway, None, "--timeout", "1") as client:
        result = await call(client, "shell_command", {"command": "sleep 60", "timeout_ms": 600000})
    assert "[time limit of 1s reached; the process was killed]" in result_text(result)


async def test_shell_command_output_keeps_its_head_and_tail(exec_gateway: FakeExecGateway) -> None:
    # 589 kB: less than the exec-server keeps of a process's output (about 1 MiB), so none of
    # it is lost before it is read.
    script = "seq 1 100000"
    async with alpha_envmcp(exec_gateway) as client:
        result = await call(client, "shell_command", {"command": script, "max_output_bytes": 2048})
    text = result_text(result)
    assert text.startswith("1\n2\n3\n")
    assert text.endswith("99999\n100000\n[exit_code=0]")
    dropped = 588_895 - 2048
    assert f"\n[… {dropped} bytes of output left out …]\n" in text
    assert len(text) < 2400


async def test_shell_command_with_a_refused_token_is_a_clear_error(
    exec_gateway: FakeExecGateway,
) -> None:
    async with alpha_envmcp(exec_gateway, token_for(workspace_id="ws_b")) as client:
        result = await call(client, "shell_command", {"command": "echo hello"})
    assert result["isError"] is True
    assert result_text(result) == (
        "[executor exe_alpha unreachable: exec gateway refused the bridge with HTTP 403 (the "
        "capability token does not grant this executor): exe_id not in token workspace]"
    )


async def test_shell_command_reports_an_executor_that_disconnects_mid_call(
    exec_gateway: FakeExecGateway, executor: Executor, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    with processes_reaped([pid_file]):
        async with alpha_envmcp(exec_gateway) as client:
            script = f"echo $$ > {pid_file}; echo started; exec sleep 300"
            request_id = await send_call(client, "shell_command", {"command": script})
            while (await next_message(client)).get("method") != "notifications/progress":
                pass  # the command runs on the executor
            executor.kill()
            result = await answer_to(client, request_id)
    assert result["isError"] is True
    text = result_text(result)
    assert text.startswith("[executor exe_alpha unreachable: bridge connection closed")
    assert "executor disconnected" in text


async def test_a_cancelled_shell_command_kills_its_process(
    exec_gateway: FakeExecGateway, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    with processes_reaped([pid_file]):
        async with alpha_envmcp(exec_gateway) as client:
            script = f"echo $$ > {pid_file}; echo started; exec sleep 300"
            request_id = await send_call(client, "shell_command", {"command": script})
            while (await next_message(client)).get("method") != "notifications/progress":
                pass
            pid = int(pid_file.read_text())
            assert alive(pid)
            await client.notify(
                "notifications/cancelled", {"requestId": request_id, "reason": "test"}
            )
            await wait_gone(pid)
            # env-mcp goes on serving.
            after = await call(client, "shell_command", {"command": "echo still here"})
    assert result_text(after) == "still here\n[exit_code=0]"


async def test_the_shell_tool_reports_an_executor_that_disconnects_mid_call(
    exec_gateway: FakeExecGateway, executor: Executor, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    with processes_reaped([pid_file]):
        async with alpha_envmcp(exec_gateway) as client:
            script = f"echo $$ > {pid_file}; echo started; exec sleep 300"
            request_id = await send_call(client, "shell", {"command": ["sh", "-c", script]})
            while (await next_message(client)).get("method") != "notifications/progress":
                pass
            executor.kill()
            result = await answer_to(client, request_id)
    assert result["isError"] is True
    assert "executor disconnected" in result_text(result)


# -- interactive sessions -----------------------------------------------------------------------


async def test_a_session_lives_across_calls(exec_gateway: FakeExecGateway) -> None:
    script = "echo ready; while read line; do echo got:$line; done; echo bye; exit 4"
    async with alpha_envmcp(exec_gateway) as client:
        started = await call(client, "exec_command", {"cmd": script, "yield_time_ms": 500})
        echoed = await call(client, "write_stdin", {"session_id": 1, "chars": "hello\n"})
        polled = await call(client, "write_stdin", {"session_id": 1, "yield_time_ms": 200})
        again = await call(client, "write_stdin", {"session_id": 1, "chars": "world\n"})
        ended = await call(client, "terminate_session", {"session_id": 1})
        gone = await call(client, "write_stdin", {"session_id": 1, "chars": "x\n"})
    running = (
        "[session 1 is running; write_stdin with session_id 1 sends input or reads more output]"
    )
    assert (result_text(started), started["isError"]) == (f"ready\n{running}", False)
    assert result_text(echoed) == f"got:hello\n{running}"
    assert result_text(polled) == running  # nothing new since the last read
    assert result_text(again) == f"got:world\n{running}"
    assert result_text(ended).endswith("[exit_code=137]\n[session 1 terminated]")
    assert ended["isError"] is False
    assert gone["isError"] is True
    assert result_text(gone) == (
        "invalid arguments: there is no session 1 (it ended or never existed); running: none"
    )


async def test_a_session_that_exits_reports_its_exit_code_and_ends(
    exec_gateway: FakeExecGateway,
) -> None:
    async with alpha_envmcp(exec_gateway) as client:
        quick = await call(client, "exec_command", {"cmd": "echo done", "yield_time_ms": 5000})
        reader = await call(client, "exec_command", {"cmd": "read x; echo $x; exit 5"})
        finished = await call(
            client, "write_stdin", {"session_id": 2, "chars": "bye\n", "yield_time_ms": 5000}
        )
        after = await call(client, "write_stdin", {"session_id": 2})
    assert result_text(quick) == "done\n[exit_code=0]\n[session 1 ended]"
    assert quick["isError"] is False
    assert "[session 2 is running" in result_text(reader)
    assert result_text(finished) == "bye\n[exit_code=5]\n[session 2 ended]"
    assert finished["isError"] is True
    assert "there is no session 2" in result_text(after)


async def test_a_session_in_a_terminal(exec_gateway: FakeExecGateway) -> None:
    async with alpha_envmcp(exec_gateway) as client:
        await call(client, "exec_command", {"cmd": "read x; echo tty:$x; tty", "tty": True})
        result = await call(
            client, "write_stdin", {"session_id": 1, "chars": "abc\n", "yield_time_ms": 5000}
        )
    text = result_text(result)
    assert "tty:abc" in text
    assert "/dev/pts/" in text
    assert "[session 1 ended]" in text


async def test_session_output_is_bounded(exec_gateway: FakeExecGateway) -> None:
    async with alpha_envmcp(exec_gateway) as client:
        result = await call(
            client,
            "exec_command",
            {"cmd": "seq 1 100000", "yield_time_ms": 10000, "max_output_bytes": 1024},
        )
    text = result_text(result)
    assert text.startswith("1\n2\n")
    assert "100000\n[exit_code=0]" in text
    assert "bytes of output left out" in text
    assert len(text) < 1300


async def test_sessions_are_bounded_in_number(
    exec_gateway: FakeExecGateway, tmp_path: Path
) -> None:
    async with alpha_envmcp(exec_gateway) as client:
        for n in range(1, 9):
            started = await call(
                client, "exec_command", {"cmd": "exec sleep 300", "yield_time_ms": 0}
            )
            assert f"[session {n} is running" in result_text(started)
        refused = await call(client, "exec_command", {"cmd": "true"})
        await call(client, "terminate_session", {"session_id": 3})
        allowed = await call(client, "exec_command", {"cmd": "echo nine", "yield_time_ms": 5000})
    assert refused["isError"] is True
    assert result_text(refused) == (
        "too many sessions: 8 are running (1, 2, 3, 4, 5, 6, 7, 8); end one with "
        "terminate_session first"
    )
    assert result_text(allowed) == "nine\n[exit_code=0]\n[session 9 ended]"


@pytest.mark.parametrize("how", ["stdin-closed", "sigterm"])
async def test_sessions_end_when_env_mcp_ends(
    exec_gateway: FakeExecGateway, tmp_path: Path, how: str
) -> None:
    pid_files = [tmp_path / f"pid{n}" for n in (1, 2)]
    with processes_reaped(pid_files):
        async with alpha_envmcp(exec_gateway) as client:
            for pid_file in pid_files:
                script = f"echo $$ > {pid_file}; echo up; exec sleep 300"
                started = await call(client, "exec_command", {"cmd": script, "yield_time_ms": 3000})
                assert "up\n" in result_text(started)
            pids = [int(p.read_text()) for p in pid_files]
            assert all(alive(pid) for pid in pids)
            if how == "sigterm":
                client.process.terminate()
                with trio.fail_after(15):
                    await client.process.wait()
                # Gone with env-mcp, not ~80 s later when the exec-server gives up a
                # connection that dropped without a close.
                for pid in pids:
                    await wait_gone(pid)
        # Leaving the block closed env-mcp's stdin: its clean exit.
        for pid in pids:
            await wait_gone(pid)
    expected = -signal.SIGTERM if how == "sigterm" else 0
    assert client.process.returncode == expected


async def test_a_session_with_a_refused_token_is_a_clear_error(
    exec_gateway: FakeExecGateway,
) -> None:
    async with alpha_envmcp(exec_gateway, token_for(ttl=-1)) as client:
        result = await call(client, "exec_command", {"cmd": "cat"})
        after = await call(client, "write_stdin", {"session_id": 1})
    assert result["isError"] is True
    assert "HTTP 401" in result_text(result)
    assert "capability token expired" in result_text(result)
    assert "there is no session 1" in result_text(after)


async def test_a_session_whose_executor_disconnects_mid_call_ends_clearly(
    exec_gateway: FakeExecGateway, executor: Executor, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    with processes_reaped([pid_file]):
        async with alpha_envmcp(exec_gateway) as client:
            script = f"echo $$ > {pid_file}; echo up; exec cat"
            await call(client, "exec_command", {"cmd": script, "yield_time_ms": 3000})
            request_id = await send_call(
                client, "write_stdin", {"session_id": 1, "yield_time_ms": 20000}
            )
            executor.kill()
            result = await answer_to(client, request_id)
            after = await call(client, "write_stdin", {"session_id": 1})
    assert result["isError"] is True
    assert result_text(result).startswith(
        "[executor exe_alpha unreachable: bridge connection closed"
    )
    assert "there is no session 1" in result_text(after)


# -- read_file ----------------------------------------------------------------------------------


@LAYOUTS
async def test_read_file_returns_numbered_lines_and_a_range(
    exec_gateway: FakeExecGateway, executor: Executor, tmp_path: Path, layout: str
) -> None:
    (executor.workdir / "notes.txt").write_text("".join(f"line {n}\n" for n in range(1, 11)))
    async with tools_envmcp(layout, exec_gateway, tmp_path) as client:
        whole = await client.call("read_file", {"path": "notes.txt"})
        part = await client.call(
            "read_file", {"path": str(executor.workdir / "notes.txt"), "offset": 9}
        )
        some = await client.call("read_file", {"path": "./notes.txt", "offset": 2, "limit": 2})
    assert whole["isError"] is False
    assert result_text(whole).split("\n") == [f"L{n}: line {n}" for n in range(1, 11)]
    assert result_text(part) == "L9: line 9\nL10: line 10"
    assert result_text(some) == "L2: line 2\nL3: line 3\n[7 more lines; read on with offset 4]"


async def test_read_file_refuses_binary_and_bounds_large_files(
    exec_gateway: FakeExecGateway, executor: Executor
) -> None:
    (executor.workdir / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    line = "x" * 1023 + "\n"
    (executor.workdir / "big.log").write_text(line * 5 * 1024)  # 5 MiB
    async with alpha_envmcp(exec_gateway) as client:
        binary = await call(client, "read_file", {"path": "blob.bin"})
        tail = await call(client, "read_file", {"path": "big.log", "offset": 4095, "limit": 5})
        beyond = await call(client, "read_file", {"path": "big.log", "offset": 5000})
    assert binary["isError"] is True
    assert result_text(binary) == (
        f"{executor.workdir / 'blob.bin'} is a binary file (700 bytes); read_file shows text only"
    )
    assert result_text(tail).split("\n")[:2] == ["L4095: " + "x" * 1023, "L4096: " + "x" * 1023]
    assert "longer than 4 MiB; only its start was read" in result_text(tail)
    assert beyond["isError"] is True
    assert "beyond the first 4 MiB" in result_text(beyond)


async def test_read_file_with_hostile_paths(
    exec_gateway: FakeExecGateway, executor: Executor, tmp_path: Path
) -> None:
    os.mkfifo(executor.workdir / "fifo")
    (executor.workdir / "d").mkdir()
    (tmp_path / "outside.txt").write_text("outside\n")
    async with alpha_envmcp(exec_gateway) as client:
        nul = await call(client, "read_file", {"path": "notes\x00.txt"})
        uri_host = await call(client, "read_file", {"path": "file://evil.example/etc/passwd"})
        assert exec_gateway.bridge_attempts == []  # refused before the bridge
        missing = await call(client, "read_file", {"path": "missing.txt"})
        directory = await call(client, "read_file", {"path": "d"})
        fifo = await call(client, "read_file", {"path": "fifo"})
        device = await call(client, "read_file", {"path": "/dev/zero"})
        up = await call(client, "read_file", {"path": "../outside.txt"})
    assert result_text(nul) == "invalid arguments: path must not contain NUL characters"
    assert "without a host" in result_text(uri_host)
    assert result_text(missing) == f"{executor.workdir / 'missing.txt'} does not exist"
    assert "is not a file" in result_text(directory)
    assert "is not a file" in result_text(fifo)
    assert result_text(device) == "cannot read /dev/zero: path `/dev/zero` is not a file"
    assert all(r["isError"] for r in (nul, uri_host, missing, directory, fifo, device))
    assert result_text(up) == "L1: outside"


# -- write_file ---------------------------------------------------------------------------------


@LAYOUTS
async def test_write_file_creates_parents_and_replaces(
    exec_gateway: FakeExecGateway, executor: Executor, tmp_path: Path, layout: str
) -> None:
    content = "first line\nsecond ☃\n"
    async with tools_envmcp(layout, exec_gateway, tmp_path) as client:
        created = await client.call("write_file", {"path": "a/b/c.txt", "content": content})
        replaced = await client.call("write_file", {"path": "a/b/c.txt", "content": "new"})
        empty = await client.call("write_file", {"path": "empty", "content": ""})
    target = executor.workdir / "a" / "b" / "c.txt"
    size = len(content.encode())
    assert result_text(created) == f"wrote {size} bytes to {target} (created)"
    assert result_text(replaced) == f"wrote 3 bytes to {target} (replaced)"
    assert target.read_text() == "new"
    assert (executor.workdir / "empty").read_bytes() == b""
    assert not empty["isError"]


async def test_write_file_with_hostile_paths_and_sizes(
    exec_gateway: FakeExecGateway, executor: Executor
) -> None:
    (executor.workdir / "d").mkdir()
    (executor.workdir / "plain").write_text("x")
    async with alpha_envmcp(exec_gateway) as client:
        huge = await call(client, "write_file", {"path": "h", "content": "x" * (1024 * 1024 + 1)})
        nul = await call(client, "write_file", {"path": "a\x00b", "content": "x"})
        newline = await call(client, "write_file", {"path": "a\nb", "content": "x"})
        assert exec_gateway.bridge_attempts == []
        directory = await call(client, "write_file", {"path": "d", "content": "x"})
        under_file = await call(client, "write_file", {"path": "plain/child", "content": "x"})
        fifo_dir = await call(client, "write_file", {"path": "/dev/null/x", "content": "x"})
    assert result_text(huge) == (
        "invalid arguments: content is 1048577 bytes; at most 1048576 are accepted"
    )
    assert "NUL" in result_text(nul)
    assert "line breaks" in result_text(newline)
    assert result_text(directory) == (
        f"{executor.workdir / 'd'} is a directory; write_file writes files only"
    )
    assert result_text(under_file) == (
        f"cannot inspect {executor.workdir / 'plain' / 'child'}: Not a directory (os error 20)"
    )
    assert fifo_dir["isError"] is True
    assert not (executor.workdir / "h").exists()
    assert (executor.workdir / "plain").read_text() == "x"


# -- apply_patch --------------------------------------------------------------------------------


@LAYOUTS
async def test_apply_patch_adds_updates_moves_and_deletes(
    exec_gateway: FakeExecGateway, executor: Executor, tmp_path: Path, layout: str
) -> None:
    work = executor.workdir
    (work / "src").mkdir()
    (work / "src" / "app.py").write_text('import os\n\ndef greet():\n    print("Hi")\n')
    (work / "obsolete.txt").write_text("old\n")
    (work / "keep.txt").write_text("a\nb\nc\n")
    patch = """*** Begin Patch
*** Add File: docs/hello.txt
+Hello world
*** Update File: src/app.py
*** Move to: src/main.py
@@ def greet():
-    print("Hi")
+    print("Hello, world!")
*** Update File: keep.txt
@@
 a
-b
+B
 c
*** Delete File: obsolete.txt
*** End Patch"""
    async with tools_envmcp(layout, exec_gateway, tmp_path) as client:
        result = await client.call("apply_patch", {"input": patch})
    assert result["isError"] is False, result_text(result)
    assert result_text(result) == (
        "Success. Updated the following files:\n"
        f"A {work / 'docs' / 'hello.txt'}\n"
        f"M {work / 'src' / 'main.py'}\n"
        f"M {work / 'keep.txt'}\n"
        f"D {work / 'obsolete.txt'}"
    )
    assert (work / "docs" / "hello.txt").read_text() == "Hello world\n"
    assert (work / "src" / "main.py").read_text() == (
        'import os\n\ndef greet():\n    print("Hello, world!")\n'
    )
    assert not (work / "src" / "app.py").exists()
    assert (work / "keep.txt").read_text() == "a\nB\nc\n"
    assert not (work / "obsolete.txt").exists()


@LAYOUTS
async def test_a_patch_that_does_not_apply_changes_nothing(
    exec_gateway: FakeExecGateway, executor: Executor, tmp_path: Path, layout: str
) -> None:
    work = executor.workdir
    (work / "a.txt").write_text("one\ntwo\n")
    (work / "exists.txt").write_text("mine\n")
    (work / "blob").write_bytes(b"\x00\x01")
    mismatch = (
        "*** Begin Patch\n*** Add File: new.txt\n+new\n*** Update File: a.txt\n@@\n-three\n"
        "+3\n*** End Patch"
    )
    clobber = "*** Begin Patch\n*** Add File: exists.txt\n+theirs\n*** End Patch"
    binary = "*** Begin Patch\n*** Update File: blob\n@@\n-x\n+y\n*** End Patch"
    missing = "*** Begin Patch\n*** Delete File: nothing.txt\n*** End Patch"
    async with tools_envmcp(layout, exec_gateway, tmp_path) as client:
        results = [
            await client.call("apply_patch", {"input": patch})
            for patch in (mismatch, clobber, binary, missing)
        ]
    texts = [result_text(r) for r in results]
    assert all(r["isError"] for r in results)
    assert all(t.startswith("the patch was not applied; nothing was changed: ") for t in texts)
    assert "a.txt: hunk 1: these lines were not found" in texts[0]
    assert "already exists; change it with Update File" in texts[1]
    assert "is a binary file" in texts[2]
    assert "does not exist, so it cannot be deleted" in texts[3]
    assert not (work / "new.txt").exists()
    assert (work / "a.txt").read_text() == "one\ntwo\n"
    assert (work / "exists.txt").read_text() == "mine\n"


async def test_apply_patch_with_hostile_input(
    exec_gateway: FakeExecGateway, executor: Executor
) -> None:
    huge = "*** Begin Patch\n*** Add File: big\n" + "+x\n" * 400_000 + "*** End Patch"
    traversal = "*** Begin Patch\n*** Add File: ../escaped.txt\n+x\n*** End Patch"
    async with alpha_envmcp(exec_gateway) as client:
        too_big = await call(client, "apply_patch", {"input": huge})
        garbage = await call(client, "apply_patch", {"input": "rm -rf /"})
        assert exec_gateway.bridge_attempts == []
        escaped = await call(client, "apply_patch", {"input": traversal})
    assert "at most 1048576 are accepted" in result_text(too_big)
    assert "first line of the patch must be '*** Begin Patch'" in result_text(garbage)
    # A path is an address on the user's own executor, resolved as the shell's cwd is.
    assert result_text(escaped).endswith(f"A {executor.workdir.parent / 'escaped.txt'}")


# -- refused tokens and lost executors for the file tools ---------------------------------------


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("read_file", {"path": "x"}),
        ("write_file", {"path": "x", "content": "y"}),
        ("apply_patch", {"input": "*** Begin Patch\n*** Add File: x\n+y\n*** End Patch"}),
    ],
)
async def test_file_tools_with_a_refused_token_or_a_lost_executor(
    exec_gateway: FakeExecGateway, executor: Executor, tool: str, arguments: dict[str, Any]
) -> None:
    async with alpha_envmcp(exec_gateway, token_for(exe_id="exe_beta")) as client:
        refused = await call(client, tool, arguments)
    assert refused["isError"] is True
    assert "HTTP 403" in result_text(refused)
    assert "exe_id not in token allow set" in result_text(refused)

    executor.kill()
    async with alpha_envmcp(exec_gateway) as client:
        lost = await call(client, tool, arguments)
    assert lost["isError"] is True
    assert result_text(lost).startswith("[executor exe_alpha unreachable: bridge connection closed")
    assert not (executor.workdir / "x").exists()


async def test_tools_list_offers_every_tool_to_codex(exec_gateway: FakeExecGateway) -> None:
    command = envmcp_command("exe_alpha", f"{exec_gateway.ws_url}/bridge/exe_alpha", TOKEN_ENV)
    async with running_envmcp(command, {TOKEN_ENV: token_for()}) as client:
        with trio.fail_after(30):
            await client.initialize()
            tools = await client.request("tools/list")
    names = [tool["name"] for tool in tools["result"]["tools"]]
    assert names == [
        "shell",
        "shell_command",
        "exec_command",
        "write_stdin",
        "terminate_session",
        "read_file",
        "write_file",
        "apply_patch",
    ]


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("read_file", {"path": "notes.txt"}),
        ("write_file", {"path": "new.txt", "content": "y"}),
        ("apply_patch", {"input": "*** Begin Patch\n*** Add File: new.txt\n+y\n*** End Patch"}),
    ],
)
async def test_file_tools_whose_executor_dies_mid_call(
    exec_gateway: FakeExecGateway, executor: Executor, tool: str, arguments: dict[str, Any]
) -> None:
    (executor.workdir / "notes.txt").write_text("hello\n")

    def kill_at_the_first_file_method(number: int, frame: str | bytes) -> None:
        text = frame if isinstance(frame, str) else frame.decode(errors="replace")
        if '"method":"fs/' in text and executor.process.returncode is None:
            executor.kill()  # the call's first file request goes to an executor that is gone

    exec_gateway.on_client_frame = kill_at_the_first_file_method
    async with alpha_envmcp(exec_gateway) as client:
        result = await call(client, tool, arguments)
    assert result["isError"] is True
    assert result_text(result) == (
        "[executor exe_alpha unreachable: bridge connection closed "
        "(code 1011: executor disconnected)]"
    )
    assert not (executor.workdir / "new.txt").exists()


async def test_multiplexed_file_tools_need_a_known_environment_id(
    exec_gateway: FakeExecGateway, executor: Executor, tmp_path: Path
) -> None:
    (executor.workdir / "notes.txt").write_text("hello\n")
    async with served_channel(tmp_path, exec_gateway) as path, channel_envmcp(path) as client:
        missing = await call(client, "read_file", {"path": "notes.txt"})
        assert exec_gateway.bridge_attempts == []  # refused before any bridge
        unknown = await call(
            client, "write_file", {"environment_id": "exe_gamma", "path": "x", "content": "y"}
        )
        beta = await call(client, "read_file", {"environment_id": "exe_beta", "path": "notes.txt"})
    assert missing["isError"] is True
    assert result_text(missing).startswith("invalid arguments: ")
    assert "list_environments" in result_text(missing)
    assert unknown["isError"] is True
    assert result_text(unknown).startswith("[environment exe_gamma unavailable: ")
    assert not (executor.workdir / "x").exists()
    assert (beta["isError"], result_text(beta)) == (False, "L1: hello")


async def test_multiplexed_sessions_belong_to_their_executor(
    exec_gateway: FakeExecGateway, tmp_path: Path
) -> None:
    script = "while read line; do echo got:$line; done"
    async with served_channel(tmp_path, exec_gateway) as path, channel_envmcp(path) as client:
        alpha = {"environment_id": "exe_alpha"}
        started = await call(client, "exec_command", {**alpha, "cmd": script, "yield_time_ms": 0})
        elsewhere = await call(
            client, "write_stdin", {"environment_id": "exe_beta", "session_id": 1, "chars": "x\n"}
        )
        echoed = await call(
            client,
            "write_stdin",
            {**alpha, "session_id": 1, "chars": "hi\n", "yield_time_ms": 5000},
        )
        ended = await call(client, "terminate_session", {**alpha, "session_id": 1})
    assert "[session 1 is running" in result_text(started)
    assert elsewhere["isError"] is True
    assert result_text(elsewhere) == (
        "session 1 runs on executor exe_alpha, not on exe_beta; call it with environment_id "
        "exe_alpha"
    )
    assert result_text(echoed).startswith("got:hi\n[session 1 is running")
    assert result_text(ended).endswith("[session 1 terminated]")
