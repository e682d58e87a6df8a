"""The multiplexed layout of env-mcp in a test: the session's executor channel, env-mcp on it.

The session's half (``serve_executor_channel`` with an ``ExecutorDirectory`` asking the fake
exec gateway for workspace ws_a) runs in the test; env-mcp is the real subprocess, started as
codex starts it with ``--channel-env``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import trio

from gateway.clients.execgateway import ExecGatewayClient
from gateway.config import ExecGatewaySettings, Secret
from gateway.envmcp.channel import SOCKET_NAME
from gateway.executor_directory import ExecutorDirectory
from gateway.sessions.executor_channel import serve_executor_channel
from gateway_tests.envmcp_stdio import CAP_SECRET, McpStdioClient, running_envmcp
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway

CHANNEL_ENV = "CXG_ENVMCP_CHANNEL"


def _settings(gateway: FakeExecGateway, ttl: float = 600.0) -> ExecGatewaySettings:
    return ExecGatewaySettings(
        ws_url=gateway.ws_url,
        internal_url=gateway.base_url,
        internal_secret=Secret(gateway.internal_secret),
        captoken_secret=Secret(CAP_SECRET.decode()),
        captoken_ttl=ttl,
    )


@asynccontextmanager
async def served_channel(
    tmp_path: Path,
    gateway: FakeExecGateway,
    *,
    admits: Callable[[int, int], str | None] = lambda pid, uid: None,
    max_age: float = 0.0,
) -> AsyncIterator[Path]:
    """The session's channel for workspace ws_a at ``<tmp>/run/executors.sock``."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    path = runtime / SOCKET_NAME
    async with httpx2.AsyncClient() as http, trio.open_nursery() as nursery:
        client = ExecGatewayClient(http, gateway.base_url, Secret(gateway.internal_secret))
        directory = ExecutorDirectory(
            client, _settings(gateway), "ws_a", "trn_chan0001", max_age=max_age
        )
        await nursery.start(serve_executor_channel, path, directory, None, admits)
        yield path
        nursery.cancel_scope.cancel()


def channel_command() -> list[str]:
    """env-mcp in the multiplexed layout, its channel's path in ``CHANNEL_ENV``."""
    return [sys.executable, "-m", "gateway.envmcp", "--channel-env", CHANNEL_ENV]


@asynccontextmanager
async def channel_envmcp(path: Path) -> AsyncIterator[McpStdioClient]:
    """env-mcp on the channel at ``path``, initialised."""
    async with running_envmcp(channel_command(), {CHANNEL_ENV: str(path)}) as client:
        with trio.fail_after(30):
            await client.initialize()
        yield client
