"""The fake model server and the fake exec gateway (with a real exec-server) of executor tests.

The fixtures are registered for every test module by ``conftest.py``; with them come the model's
scripted ``shell`` call on ``exe_alpha`` and the checks of what the model was offered and got.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway, run_exec_server
from gateway_tests.fakes.fake_model_server import (
    FakeModelServer,
    FunctionCallReply,
    announced_mcp_namespaces,
    function_call_outputs,
    output_text,
)

CAP_SECRET = b"cap-s3cret"
WORKSPACE = "ws_e2e"
API_KEY = "sk-e2e"
# A turn with a real codex that spawns env-mcp and reaches a real exec-server.
TURN_TIMEOUT = 90
SHELL_CALL_ID = "call_shell_1"


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


def shell_call(
    command: list[str],
    *,
    namespace: str = "mcp__exe_alpha",
    target: dict[str, str] | None = None,
) -> FunctionCallReply:
    """The model's reply that has codex run ``command`` with a ``shell`` tool.

    The default is ``exe_alpha``'s own server (the per-executor layout); the multiplexed
    layout's is ``namespace="mcp__executors"`` with ``target={"environment_id": ...}``.
    """
    return FunctionCallReply(
        namespace=namespace,
        name="shell",
        arguments={**(target or {}), "command": command},
        call_id=SHELL_CALL_ID,
    )


def assert_first_request_offers(model: FakeModelServer, namespace: str) -> None:
    """The thread's first model request lists ``namespace`` (as a tool or a deferred one)."""
    requests = model.responses_requests()
    assert requests, "the turn never reached the model"
    offered = announced_mcp_namespaces(requests[0].body)
    assert namespace in offered, f"first model request offered {sorted(offered)}, not {namespace}"


def tool_output_seen_by_model(model: FakeModelServer) -> str:
    """The output of the ``shell_call`` as the model's next request carries it back."""
    outputs = [
        item
        for request in model.responses_requests()
        for item in function_call_outputs(request.body)
        if item.get("call_id") == SHELL_CALL_ID
    ]
    assert outputs, "the tool's result never reached the model"
    return output_text(outputs[0])


def model_vars(model_server: FakeModelServer) -> dict[str, str]:
    """The real codex child's model: the fake model server, with the key it accepts."""
    return {
        "CXG_MODEL_PROVIDER_BASE_URL": f"{model_server.base_url}/v1",
        "CXG_CODEX_API_KEY": API_KEY,
        "CXG_MODEL": "gateway-test-model",
        "CXG_CHILD_READY_TIMEOUT": "60s",
    }


def exec_vars(gateway: FakeExecGateway) -> dict[str, str]:
    """The gateway's exec-gateway variables for the fake exec gateway ``gateway``."""
    return {
        "CXG_EXEC_GATEWAY_URL": gateway.ws_url,
        "CXG_EXEC_GATEWAY_INTERNAL_URL": gateway.base_url,
        "CXG_EXEC_GATEWAY_INTERNAL_SECRET": gateway.internal_secret,
        "CXG_CAPTOKEN_HMAC_SECRET": CAP_SECRET.decode(),
    }
