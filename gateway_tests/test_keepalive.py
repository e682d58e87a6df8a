"""Clients are pinged; a client that stops answering is dropped and its child leg closed."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import trio

from gateway_tests.harness import LaunchGateway, connect, eventually, token_for


async def _raw_upgrade(host: str, port: int, workspace_id: str) -> trio.SocketStream:
    """Open a WebSocket by hand and then never read or answer anything (a dead peer)."""
    stream = await trio.open_tcp_stream(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET / HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token_for(workspace_id)}\r\n\r\n"
    )
    await stream.send_all(request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += await stream.receive_some(4096)
    assert response.startswith(b"HTTP/1.1 101"), response
    return stream


async def test_live_client_answers_pings_and_stays_connected(launch_gateway: LaunchGateway) -> None:
    gateway = await launch_gateway(CXG_WS_PING_INTERVAL="200ms")
    async with connect(gateway, "ws_alive") as rpc:
        # Quiet for many ping intervals: trio-websocket answers the pings by itself.
        with trio.move_on_after(1.5):
            await rpc.ws.get_message()
        reply = await rpc.result("fake/echo", {"payload": "still here"})
        assert reply["payload"] == "still here"


async def test_dead_client_is_dropped_and_its_child_connection_closed(
    launch_gateway: LaunchGateway, tmp_path: Path
) -> None:
    gateway = await launch_gateway(CXG_WS_PING_INTERVAL="200ms")
    async with connect(gateway, "ws_dead") as rpc:
        await rpc.result("fake/echo", {"payload": "start the session"})
    host, port = gateway.http_url.removeprefix("http://").split(":")
    silent = await _raw_upgrade(host, int(port), "ws_dead")
    closes = tmp_path / "sessions" / "ws_dead" / "codex-home" / "fake-codex-closes.jsonl"

    def child_leg_closed_twice() -> bool:
        # The first close is the warm-up client's; the second is the dead client's leg.
        return closes.exists() and len(closes.read_text().splitlines()) >= 2

    with trio.fail_after(10):
        # The gateway hangs up on the silent peer: the socket reaches EOF or is reset.
        try:
            while await silent.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
    await eventually(child_leg_closed_twice)
    last = json.loads(closes.read_text().splitlines()[-1])
    assert last["code"] in (1000, 1001, 1006)
    await silent.aclose()
    assert (await gateway.session("ws_dead"))["clients"] == 0  # type: ignore[index]
