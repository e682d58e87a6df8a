"""The exec gateway's `connected` call: request shape, decoding, and errors without secrets."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Callable

import httpx2
import pytest
import trio

from gateway.clients.execgateway import (
    MAX_RESPONSE_BYTES,
    ConnectedExecutor,
    ExecGatewayClient,
    ExecGatewayError,
)
from gateway.config import Secret
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway

SECRET = "in-s3cret-value"


@pytest.fixture
async def fake() -> AsyncIterator[FakeExecGateway]:
    gateway = FakeExecGateway(internal_secret=SECRET, captoken_secret=b"cap")
    gateway.add_executor(
        "exe_alpha",
        workspace_id="ws_a",
        backend_url=None,
        description="Daisy's MacBook",
        default_cwd="/home/daisy",
        is_default=True,
    )
    gateway.add_executor("exe-beta", workspace_id="ws_a", backend_url=None)
    gateway.add_executor("exe_other", workspace_id="ws_b", backend_url=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        yield gateway
        nursery.cancel_scope.cancel()


def mock_client(handler: Callable[[httpx2.Request], httpx2.Response]) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.MockTransport(handler))


async def test_happy_path_sends_bearer_and_workspace_and_decodes(fake: FakeExecGateway) -> None:
    async with httpx2.AsyncClient() as http:
        client = ExecGatewayClient(http, fake.base_url, Secret(SECRET))
        executors = await client.connected("ws_a")
    assert [e.exe_id for e in executors] == ["exe_alpha", "exe-beta"]
    alpha = executors[0]
    assert alpha.description == "Daisy's MacBook"
    assert alpha.default_cwd == "/home/daisy"
    assert alpha.is_default is True
    assert isinstance(alpha.last_seen_at, dt.datetime)
    request = fake.connected_requests[-1]
    assert request["headers"]["authorization"] == f"Bearer {SECRET}"
    assert request["headers"]["accept"] == "application/json"
    assert request["query"] == {"workspace_id": "ws_a"}


async def test_trailing_slash_on_the_base_url_is_tolerated(fake: FakeExecGateway) -> None:
    async with httpx2.AsyncClient() as http:
        client = ExecGatewayClient(http, fake.base_url + "/", Secret(SECRET))
        assert [e.exe_id for e in await client.connected("ws_b")] == ["exe_other"]


async def test_workspace_id_is_url_encoded() -> None:
    seen: list[httpx2.URL] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.url)
        return httpx2.Response(200, json=[])

    async with mock_client(handler) as http:
        client = ExecGatewayClient(http, "http://execgw", Secret(SECRET))
        assert await client.connected("ws a&b=c") == ()
    assert seen[0].path == "/api/exec-gateway/connected"
    assert seen[0].params["workspace_id"] == "ws a&b=c"


async def test_empty_workspace_id_is_rejected_without_a_request() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise AssertionError("no request expected")

    async with mock_client(handler) as http:
        client = ExecGatewayClient(http, "http://execgw", Secret(SECRET))
        with pytest.raises(ExecGatewayError, match="workspaceID required"):
            await client.connected("")


async def test_non_200_is_an_error_with_status_and_body_but_not_the_secret(
    fake: FakeExecGateway,
) -> None:
    async with httpx2.AsyncClient() as http:
        client = ExecGatewayClient(http, fake.base_url, Secret("wrong-secret"))
        with pytest.raises(ExecGatewayError, match="status=401") as caught:
            await client.connected("ws_a")
    assert "unauthorized" in str(caught.value)
    assert "wrong-secret" not in str(caught.value)


async def test_secret_echoed_by_a_broken_server_is_redacted() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(500, text=f"boom {request.headers['authorization']}")

    async with mock_client(handler) as http:
        client = ExecGatewayClient(http, "http://execgw", Secret(SECRET))
        with pytest.raises(ExecGatewayError, match="status=500") as caught:
            await client.connected("ws_a")
    assert SECRET not in str(caught.value)
    assert "***" in str(caught.value)


async def test_unreachable_exec_gateway_is_an_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connection refused
        async with httpx2.AsyncClient() as http:
            client = ExecGatewayClient(http, f"http://127.0.0.1:{port}", Secret(SECRET))
            with pytest.raises(ExecGatewayError, match=r"execgwclient: GET http://127\.0\.0\.1"):
                await client.connected("ws_a")


async def test_unknown_fields_and_nulls_are_tolerated() -> None:
    body = [
        {"exe_id": "exe_a", "description": None, "name": "new field", "last_seen_at": None},
        {"exe_id": "exe_b", "last_seen_at": "not a time", "client_info": {"os": "linux"}},
        {"exe_id": "exe_c", "last_seen_at": "2026-11-24T00:00:00.123456789Z"},
    ]

    async with mock_client(lambda _: httpx2.Response(200, json=body)) as http:
        executors = await ExecGatewayClient(http, "http://x", Secret(SECRET)).connected("ws")
    assert executors[:2] == (ConnectedExecutor("exe_a"), ConnectedExecutor("exe_b"))
    assert executors[2].last_seen_at == dt.datetime(2026, 11, 24, 0, 0, 0, 123456, tzinfo=dt.UTC)


async def test_entries_without_an_exe_id_are_skipped() -> None:
    body = [{"description": "no id"}, {"exe_id": ""}, {"exe_id": "exe_ok"}]
    async with mock_client(lambda _: httpx2.Response(200, json=body)) as http:
        executors = await ExecGatewayClient(http, "http://x", Secret(SECRET)).connected("ws")
    assert [e.exe_id for e in executors] == ["exe_ok"]


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"exe_id": "x"}', b"[1]", b'[{"exe_id": "x", "is_default": "yes"}]'],
)
async def test_undecodable_answers_are_errors(body: bytes) -> None:
    async with mock_client(lambda _: httpx2.Response(200, content=body)) as http:
        client = ExecGatewayClient(http, "http://x", Secret(SECRET))
        with pytest.raises(ExecGatewayError, match="decode response"):
            await client.connected("ws")


async def test_an_oversized_answer_is_refused() -> None:
    item = json.dumps({"exe_id": "x" * 1000}).encode()
    body = b"[" + b",".join([item] * (MAX_RESPONSE_BYTES // len(item) + 10)) + b"]"
    async with mock_client(lambda _: httpx2.Response(200, content=body)) as http:
        client = ExecGatewayClient(http, "http://x", Secret(SECRET))
        with pytest.raises(ExecGatewayError, match="larger than"):
            await client.connected("ws")


async def test_a_hanging_exec_gateway_times_out(autojump_clock: trio.abc.Clock) -> None:
    async def hang(request: httpx2.Request) -> httpx2.Response:
        await trio.sleep_forever()
        raise AssertionError

    transport = httpx2.MockTransport(hang)
    async with httpx2.AsyncClient(transport=transport) as http:
        client = ExecGatewayClient(http, "http://x", Secret(SECRET))
        with pytest.raises(ExecGatewayError, match="timed out after 5s"):
            await client.connected("ws")
