"""Kept connections: a tool whose state outlives a call sees it at the next call.

exec-server 0.169.0 forgets a connection's processes when it closes; tools registered with
``keep_connection`` share the executor's kept connection instead. The tools here are test specs
registered on an in-process ``ToolServer``; the bridge is the fake exec gateway's, relaying to a
real ``codex exec-server``.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.envmcp.bridge import BridgeError, ExecServerError
from gateway.envmcp.registry import TextOutcome, ToolCall, ToolSpec
from gateway.envmcp.server import EnvMcpSettings, FixedExecutor, ToolServer
from gateway.envmcp.shell import CORE_ENV_POLICY
from gateway_tests.envmcp_stdio import CAP_SECRET, token_for
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway, run_exec_server

SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}}}


async def start_talker(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    """Start a process that says hello and then waits."""
    await call.client.call(
        "process/start",
        {
            "processId": arguments["id"],
            "argv": ["sh", "-c", "echo hello-from-before; sleep 60"],
            "cwd": "file:///tmp",
            "env": {},
            "envPolicy": CORE_ENV_POLICY,
            "tty": False,
            "pipeStdin": False,
        },
    )
    return TextOutcome("started", is_error=False)


async def read_talker(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    """Read what the process said so far (an error outcome if exec-server does not know it)."""
    try:
        result = await call.client.call(
            "process/read",
            {"processId": arguments["id"], "afterSeq": 0, "maxBytes": 4096, "waitMs": 2000},
        )
    except ExecServerError as exc:
        return TextOutcome(exc.message, is_error=True)
    text = b"".join(base64.b64decode(c["chunk"]) for c in result["chunks"]).decode()
    return TextOutcome(text, is_error=False)


async def stop_talker(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    await call.client.call("process/terminate", {"processId": arguments["id"]})
    return TextOutcome("stopped", is_error=False)


async def break_connection(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    raise BridgeError("bridge connection closed (test)")


def _spec(name: str, handler: str, *, keep: bool) -> ToolSpec:
    return ToolSpec(
        name=name,
        description="test tool on `{environment}`",
        input_schema=SCHEMA,
        handler=f"gateway_tests.test_envmcp_kept:{handler}",
        keep_connection=keep,
    )


START = _spec("start", "start_talker", keep=True)
READ = _spec("read", "read_talker", keep=True)
STOP = _spec("stop", "stop_talker", keep=True)
BREAK = _spec("break", "break_connection", keep=True)
READ_ALONE = _spec("read_alone", "read_talker", keep=False)


@pytest.fixture
async def bridge(real_codex_bin: Path, tmp_path: Path) -> AsyncIterator[FakeExecGateway]:
    home = tmp_path / "executor-home"
    home.mkdir()
    gateway = FakeExecGateway(internal_secret="in-s3cret", captoken_secret=CAP_SECRET)
    async with trio.open_nursery() as nursery:
        backend = await nursery.start(run_exec_server, real_codex_bin, home)
        gateway.add_executor("exe_alpha", workspace_id="ws_a", backend_url=backend)
        await nursery.start(gateway.serve)
        yield gateway
        nursery.cancel_scope.cancel()


@pytest.fixture
async def server(bridge: FakeExecGateway) -> AsyncIterator[ToolServer]:
    settings = EnvMcpSettings(
        exe_id="exe_alpha",
        bridge_url=f"{bridge.ws_url}/bridge/exe_alpha",
        token=token_for(),
        exe_desc="box",
    )
    tools = (START, READ, STOP, BREAK, READ_ALONE)
    server = ToolServer(FixedExecutor(settings), time_limit=30, tools=tools)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.kept.run)
        yield server
        nursery.cancel_scope.cancel()


async def test_a_process_started_in_one_call_is_there_in_the_next(
    server: ToolServer, bridge: FakeExecGateway
) -> None:
    with trio.fail_after(60):
        started = await server.call(START, {"id": "talker-1"})
        said = await server.call(READ, {"id": "talker-1"})
        alone = await server.call(READ_ALONE, {"id": "talker-1"})
        stopped = await server.call(STOP, {"id": "talker-1"})
    assert (started.text, started.is_error) == ("started", False)
    assert "hello-from-before" in said.text and not said.is_error
    # A connection of its own does not know the process: why tools keep one.
    assert alone.is_error and "unknown process id" in alone.text
    assert not stopped.is_error
    # Three kept calls, one bridge connection; the lone call dialled its own.
    assert [a.status for a in bridge.bridge_attempts] == [101, 101]


async def test_a_broken_kept_connection_is_redialled(
    server: ToolServer, bridge: FakeExecGateway
) -> None:
    with trio.fail_after(60):
        await server.call(START, {"id": "talker-2"})
        broken = await server.call(BREAK, {})
        after = await server.call(READ, {"id": "talker-2"})
    assert broken.is_error and "unreachable" in broken.text
    # A new connection: the old one's process went with it, and says so clearly.
    assert after.is_error and "unknown process id" in after.text
    assert [a.status for a in bridge.bridge_attempts] == [101, 101]


async def test_kept_calls_take_turns(server: ToolServer, bridge: FakeExecGateway) -> None:
    results: list[str] = []
    with trio.fail_after(60):
        await server.call(START, {"id": "talker-3"})

        async def read() -> None:
            results.append((await server.call(READ, {"id": "talker-3"})).text)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(read)
        await server.call(STOP, {"id": "talker-3"})
    assert len(results) == 3 and all("hello-from-before" in text for text in results)
    assert [a.status for a in bridge.bridge_attempts] == [101]
