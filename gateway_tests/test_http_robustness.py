"""Bad bytes on the listening port hurt only their own connection (SPEC §3.3, §8; hypercorn#225).

Each hostile connection is made with raw TCP while a client of a running session is attached;
afterwards that client still works, a new client can connect, and ``/healthz`` answers. The
plain HTTP routes are checked here too.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import httpx2
import pytest
import trio

from gateway_tests.harness import (
    POLL_INTERVAL,
    Rpc,
    RunningGateway,
    connect,
    token_for,
)

WORKSPACE = "ws_robust"
# A hostile connection must be answered or dropped within this.
EXCHANGE_TIMEOUT = 10.0


def address(gateway: RunningGateway) -> tuple[str, int]:
    """The gateway's host and port."""
    host, port = gateway.http_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def upgrade_request(
    gateway: RunningGateway, *, key: str | None = None, token: str | None = None
) -> bytes:
    """A WebSocket upgrade request for ``/`` as ``codex --remote`` sends it."""
    host, port = address(gateway)
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    token = token if token is not None else token_for(WORKSPACE)
    return (
        f"GET / HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "\r\n"
    ).encode()


async def open_raw(gateway: RunningGateway) -> trio.SocketStream:
    """A plain TCP connection to the gateway's port."""
    return await trio.open_tcp_stream(*address(gateway))


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection (bounded in time)."""
    received = b""
    with trio.fail_after(EXCHANGE_TIMEOUT):
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass  # a reset is also an end
    return received


async def read_response_head(stream: trio.SocketStream) -> bytes:
    """Read up to the end of an HTTP response's headers."""
    received = b""
    with trio.fail_after(EXCHANGE_TIMEOUT):
        while b"\r\n\r\n" not in received:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed early after {received!r}"
            received += chunk
    return received


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.1 response."""
    return int(response.split(b" ", 2)[1])


def reset(stream: trio.SocketStream) -> None:
    """Make the coming close a TCP reset (SO_LINGER 0) instead of an orderly FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def client_count(gateway: RunningGateway) -> int:
    """Clients of the workspace's session according to the admin listing."""
    entry = await gateway.session(WORKSPACE)
    assert entry is not None
    return int(entry["clients"])


async def wait_for_client_count(gateway: RunningGateway, expected: int) -> None:
    """Wait until the session has ``expected`` clients (nothing signals this: poll)."""
    with trio.fail_after(EXCHANGE_TIMEOUT):
        while await client_count(gateway) != expected:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(POLL_INTERVAL)


async def assert_still_serving(gateway: RunningGateway, bystander: Rpc) -> None:
    """The attached client works, a new client works, and health answers."""
    with trio.fail_after(EXCHANGE_TIMEOUT):
        echoed = await bystander.result("fake/echo", {"payload": "still here"})
        assert echoed["payload"] == "still here"
        async with connect(gateway, WORKSPACE) as fresh:
            assert (await fresh.result("fake/echo", {"payload": "new"}))["payload"] == "new"
            assert (await fresh.result("fake/pid"))["pid"] == (await bystander.result("fake/pid"))[
                "pid"
            ]
        async with httpx2.AsyncClient(timeout=EXCHANGE_TIMEOUT) as http:
            assert (await http.get(f"{gateway.http_url}/healthz")).status_code == 200


# -- the hostile connections --------------------------------------------------------------------


async def garbage_bytes(gateway: RunningGateway) -> None:
    """Bytes that are not HTTP at all (here: the start of a TLS ClientHello, then noise)."""
    stream = await open_raw(gateway)
    async with stream:
        await stream.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(2048))
        response = await read_to_eof(stream)
    assert response == b"" or status_of(response) == 400, response[:200]


async def malformed_request(gateway: RunningGateway) -> None:
    """A request line and a header line that break HTTP/1.1's grammar."""
    stream = await open_raw(gateway)
    async with stream:
        await stream.send_all(b"GET /\x00 HTTP/9.9\r\nno colon in this header\r\n\r\n")
        response = await read_to_eof(stream)
    assert response == b"" or status_of(response) == 400, response[:200]


async def upgrade_with_trailing_byte(gateway: RunningGateway) -> None:
    """hypercorn#225: a valid upgrade and a stray byte in the same TCP write."""
    stream = await open_raw(gateway)
    async with stream:
        await stream.send_all(upgrade_request(gateway) + b"x")
        response = await read_to_eof(stream)
    assert status_of(response) == 400, response[:200]
    # The handler that had started for this request ends too: no phantom client is left.
    await wait_for_client_count(gateway, 1)


async def hypercorn_upgrade_with_trailing_byte(gateway: RunningGateway) -> None:
    """hypercorn#225 inside Hypercorn: an upgrade it serves (not a relay path) plus a stray byte.

    Hypercorn's h11 glue raises ``LocalProtocolError`` out of the connection's task here; the
    front door's guard must keep that inside this one connection.
    """
    stream = await open_raw(gateway)
    async with stream:
        request = upgrade_request(gateway).replace(b"GET / ", b"GET /elsewhere ", 1)
        await stream.send_all(request + b"x")
        response = await read_to_eof(stream)
    assert response == b"" or status_of(response) == 400, response[:200]


async def upgrade_with_bad_key(gateway: RunningGateway) -> None:
    """``Sec-WebSocket-Key`` that is not 16 base64-encoded bytes: refused, never switched."""
    for key in ("not a key!", base64.b64encode(b"fifteen bytes!!").decode()):
        stream = await open_raw(gateway)
        async with stream:
            await stream.send_all(upgrade_request(gateway, key=key))
            response = await read_to_eof(stream)
        assert status_of(response) == 400, response[:200]
    assert await client_count(gateway) == 1


async def silent_connection(gateway: RunningGateway) -> None:
    """A client that connects, sends nothing and goes away."""
    stream = await open_raw(gateway)
    await stream.aclose()


async def half_frame_then_reset(gateway: RunningGateway) -> None:
    """An attached WebSocket client that sends half a frame, then resets the connection."""
    stream = await open_raw(gateway)
    try:
        await stream.send_all(upgrade_request(gateway))
        head = await read_response_head(stream)
        assert status_of(head) == 101, head
        await wait_for_client_count(gateway, 2)
        # A masked text frame announcing 100 bytes of payload, of which 10 arrive.
        header = bytes([0x81, 0x80 | 126]) + struct.pack("!H", 100) + os.urandom(4)
        await stream.send_all(header + b"0123456789")
        reset(stream)
    finally:
        await stream.aclose()
    # The relay of the dead client is cleaned up; the bystander remains.
    await wait_for_client_count(gateway, 1)


HOSTILE: list[Callable[[RunningGateway], Awaitable[None]]] = [
    garbage_bytes,
    malformed_request,
    upgrade_with_trailing_byte,
    hypercorn_upgrade_with_trailing_byte,
    upgrade_with_bad_key,
    silent_connection,
    half_frame_then_reset,
]


@pytest.mark.parametrize("hostile", HOSTILE, ids=[f.__name__ for f in HOSTILE])
async def test_a_hostile_connection_leaves_the_session_and_the_server_working(
    gateway: RunningGateway, hostile: Callable[[RunningGateway], Awaitable[None]]
) -> None:
    async with connect(gateway, WORKSPACE) as bystander:
        await hostile(gateway)
        await assert_still_serving(gateway, bystander)


async def test_every_hostile_connection_in_a_row_leaves_everything_working(
    gateway: RunningGateway,
) -> None:
    async with connect(gateway, WORKSPACE) as bystander:
        for hostile in HOSTILE * 2:
            await hostile(gateway)
        await assert_still_serving(gateway, bystander)


# -- plain HTTP routes --------------------------------------------------------------------------


async def test_plain_get_of_the_websocket_paths_gets_426(gateway: RunningGateway) -> None:
    async with httpx2.AsyncClient(timeout=EXCHANGE_TIMEOUT) as http:
        for path in ("/", "/codex-app/ws"):
            response = await http.get(f"{gateway.http_url}{path}")
            assert response.status_code == 426, path
            assert response.headers["upgrade"] == "websocket"


async def test_unknown_path_gets_404(gateway: RunningGateway) -> None:
    async with httpx2.AsyncClient(timeout=EXCHANGE_TIMEOUT) as http:
        response = await http.get(f"{gateway.http_url}/no/such/path")
    assert response.status_code == 404


async def test_websocket_upgrade_on_an_unknown_path_is_refused(gateway: RunningGateway) -> None:
    stream = await open_raw(gateway)
    async with stream:
        await stream.send_all(upgrade_request(gateway).replace(b"GET / ", b"GET /elsewhere ", 1))
        response = await read_to_eof(stream)
    assert response and status_of(response) != 101, response[:200]
    assert await gateway.sessions() == []


async def test_metrics_are_served_in_prometheus_format(gateway: RunningGateway) -> None:
    async with connect(gateway, WORKSPACE):
        pass
    async with httpx2.AsyncClient(timeout=EXCHANGE_TIMEOUT) as http:
        response = await http.get(f"{gateway.http_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names = {
        line.split("{")[0].split(" ")[0]
        for line in response.text.splitlines()
        if line and not line.startswith("#")
    }
    assert any(name.startswith("cxg_") for name in names), sorted(names)[:20]


async def test_readyz_and_healthz_answer_200_while_serving(gateway: RunningGateway) -> None:
    async with httpx2.AsyncClient(timeout=EXCHANGE_TIMEOUT) as http:
        for path in ("/readyz", "/healthz"):
            assert (await http.get(f"{gateway.http_url}{path}")).status_code == 200, path
