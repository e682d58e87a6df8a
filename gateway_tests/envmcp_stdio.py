"""env-mcp as codex runs it: a child on stdio, spoken to as an MCP client, and its tokens.

Shared by the env-mcp tests of both layouts (one server per executor, and the multiplexed one
that asks its session's executor channel).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from gateway.captoken import mint_cap_token
from gateway_tests.executor_fixtures import CAP_SECRET
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway

PROTOCOL_VERSION = "2025-06-18"


class McpStdioClient:
    """A newline-delimited JSON-RPC client over a child's stdin/stdout.

    Every line the child prints on stdout must be a JSON-RPC message; anything else fails the
    test, since codex would choke on it too.
    """

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._buffer = b""
        self._ids = itertools.count(1)
        self.notifications: list[dict[str, Any]] = []

    async def send(self, message: Mapping[str, Any]) -> None:
        await self._stdin.send_all(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")

    async def _next_message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = await self._stdout.receive_some()
            if not chunk:
                raise EOFError(f"env-mcp closed stdout; unread: {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        assert message.get("jsonrpc") == "2.0", line
        return message

    async def request(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send a request; return the whole response message (``result`` or ``error``)."""
        request_id = next(self._ids)
        message: dict[str, Any] = {"id": request_id, "method": method}
        if params is not None:
            message["params"] = dict(params)
        await self.send(message)
        while True:
            answer = await self._next_message()
            if answer.get("id") == request_id and "method" not in answer:
                return answer
            self.notifications.append(answer)

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"method": method}
        if params is not None:
            message["params"] = dict(params)
        await self.send(message)

    async def initialize(self) -> dict[str, Any]:
        answer = await self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "gateway-tests", "version": "1"},
            },
        )
        await self.notify("notifications/initialized")
        return answer

    async def call_shell(
        self, command: Sequence[str], cwd: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        """Call the ``shell`` tool; return its result (fails the test on a JSON-RPC error)."""
        arguments: dict[str, Any] = {"command": list(command), **extra}
        if cwd is not None:
            arguments["cwd"] = cwd
        answer = await self.request("tools/call", {"name": "shell", "arguments": arguments})
        assert "result" in answer, answer
        return answer["result"]


def result_text(result: Mapping[str, Any]) -> str:
    return "".join(item["text"] for item in result["content"] if item["type"] == "text")


def envmcp_command(exe_id: str, bridge_url: str, token_env: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gateway.envmcp",
        "--exe-id",
        exe_id,
        "--bridge-url",
        bridge_url,
        "--token-env",
        token_env,
        *extra,
    ]


@asynccontextmanager
async def running_envmcp(
    command: Sequence[str], env: Mapping[str, str], stderr: Any = None
) -> AsyncIterator[McpStdioClient]:
    """Start env-mcp; on exit close its stdin (its clean-exit path) and wait for it."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                list(command),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, **env},
                check=False,
            )
        )
        client = McpStdioClient(process)
        try:
            yield client
        finally:
            await client._stdin.aclose()
            with trio.move_on_after(10):
                await process.wait()
            nursery.cancel_scope.cancel()


TOKEN_ENV = "CXG_BRIDGE_TOKEN_EXE_ALPHA"


def token_for(
    exe_id: str = "exe_alpha",
    workspace_id: str = "ws_a",
    ttl: float = 600,
    secret: bytes = CAP_SECRET,
) -> str:
    return mint_cap_token(secret, "trn_test0001", workspace_id, exe_id, ttl)


# What a stdio MCP server does not need before its first tool call (issue: codex leaves a server
# that is slow to answer tools/list out of a thread's first model request).
NOT_IMPORTED_AT_START = (
    "gateway.envmcp.bridge",
    "gateway.envmcp.shell",
    # The executor tools' code: only their specs (gateway.envmcp.specs) are needed to list them.
    "gateway.envmcp.tools.exec",
    "gateway.envmcp.tools.sessions",
    "gateway.envmcp.tools.files",
    "gateway.envmcp.tools.patch",
    "gateway.envmcp.tools.fs",
    "gateway.envmcp.tools.process_io",
    "trio_websocket",
    "gateway.config",
    "gateway.auth",
    "gateway.captoken",
)


TURN_ID = "trn_test0001"


@asynccontextmanager
async def alpha_envmcp(
    gateway: FakeExecGateway, token: str | None = None, *extra: str
) -> AsyncIterator[McpStdioClient]:
    """env-mcp for exe_alpha (one executor), initialised, with ``token`` (default: a valid one)."""
    command = envmcp_command(
        "exe_alpha", f"{gateway.ws_url}/bridge/exe_alpha", TOKEN_ENV, "--turn-id", TURN_ID, *extra
    )
    env = {TOKEN_ENV: token_for() if token is None else token}
    async with running_envmcp(command, env) as client:
        with trio.fail_after(30):
            await client.initialize()
        yield client
