"""The relay's own WebSocket to the child: messages in order, pings answered, closes carried."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from gateway.sessions.child_socket import ChildClosed, ChildRejected, open_child_socket


async def _start_peer(nursery: trio.Nursery, handler) -> str:  # type: ignore[no-untyped-def]
    server = await nursery.start(
        partial(serve_websocket, handler, "127.0.0.1", 0, ssl_context=None)
    )
    return f"ws://127.0.0.1:{server.port}/"


async def test_messages_pings_and_the_peer_close_reach_the_relay(nursery: trio.Nursery) -> None:
    pong = trio.Event()

    async def peer(request: WebSocketRequest) -> None:
        assert request.headers and dict(request.headers).get(b"authorization") == b"Bearer t"
        ws = await request.accept()
        await ws.send_message("right after the upgrade")
        await ws.ping(b"are you there")  # returns once the pong arrived
        pong.set()
        await ws.send_message(await ws.get_message())  # echo, text stays text
        await ws.send_message(await ws.get_message())  # binary stays binary
        await ws.aclose(4001, "bye")

    url = await _start_peer(nursery, peer)
    with trio.fail_after(10):
        async with open_child_socket(
            url, [("authorization", "Bearer t")], max_message_size=1 << 20, connect_timeout=5
        ) as child:
            assert await child.receive_message() == "right after the upgrade"
            await child.send_message("text")
            # Receiving is what answers pings: the echo only comes after the pong.
            assert await child.receive_message() == "text"
            assert pong.is_set()
            await child.send_message(b"\x00binary")
            assert await child.receive_message() == b"\x00binary"
            with pytest.raises(ChildClosed) as closed:
                await child.receive_message()
            assert (closed.value.code, closed.value.reason) == (4001, "bye")


async def test_an_oversized_message_from_the_child_is_a_1009_close(nursery: trio.Nursery) -> None:
    async def peer(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("y" * 2000)
        await trio.sleep_forever()

    url = await _start_peer(nursery, peer)
    with trio.fail_after(10):
        async with open_child_socket(url, [], max_message_size=1024, connect_timeout=5) as child:
            with pytest.raises(ChildClosed) as closed:
                await child.receive_message()
    assert closed.value.code == 1009


async def test_a_refused_upgrade_names_the_status(nursery: trio.Nursery) -> None:
    async def peer(request: WebSocketRequest) -> None:
        await request.reject(401, body=b"invalid websocket bearer token")

    url = await _start_peer(nursery, peer)
    with trio.fail_after(10), pytest.raises(ChildRejected) as rejected:
        async with open_child_socket(url, [], max_message_size=1024, connect_timeout=5):
            pass
    assert rejected.value.status == 401
