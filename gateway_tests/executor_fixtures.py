"""The fake model server and the fake exec gateway (with a real exec-server) of executor tests.

Registered for every test module by ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway, run_exec_server
from gateway_tests.fakes.fake_model_server import FakeModelServer

CAP_SECRET = b"cap-s3cret"
WORKSPACE = "ws_e2e"
API_KEY = "sk-e2e"


@pytest.fixture
async def model() -> AsyncIterator[FakeModelServer]:
    server = FakeModelServer(accept=lambda token: token == API_KEY)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


@pytest.fixture
async def exec_gateway(real_codex_bin: Path, tmp_path: Path) -> AsyncIterator[FakeExecGateway]:
    """The fake exec gateway relaying exe_alpha (of WORKSPACE) to a real exec-server."""
    executor_home = tmp_path / "executor-home"
    executor_home.mkdir()
    gateway = FakeExecGateway(internal_secret="in-s3cret", captoken_secret=CAP_SECRET)
    async with trio.open_nursery() as nursery:
        backend = await nursery.start(run_exec_server, real_codex_bin, executor_home)
        gateway.add_executor(
            "exe_alpha", workspace_id=WORKSPACE, backend_url=backend, description="Test box"
        )
        await nursery.start(gateway.serve)
        yield gateway
        nursery.cancel_scope.cancel()
