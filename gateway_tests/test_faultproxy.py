"""The fault-injecting TCP proxy (gateway_tests/faultproxy.py) against a loopback echo server."""

from __future__ import annotations

import contextlib

import attrs
import pytest
import trio

from gateway_tests.faultproxy import FaultProxy

# How long "nothing arrives" is watched for; time passing is the behaviour under test there.
QUIET = 0.5


@attrs.define
class Echo:
    """A loopback echo server that counts its connections and the bytes it saw."""

    port: int = 0
    connections: int = 0
    received: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[Echo]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._echo, listeners)

    async def _echo(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            while data := await stream.receive_some(65536):
                self.received += len(data)
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


@pytest.fixture
async def echo(nursery: trio.Nursery) -> Echo:
    server: Echo = await nursery.start(Echo().serve)
    return server


@pytest.fixture
async def proxy(nursery: trio.Nursery, echo: Echo) -> FaultProxy:
    started: FaultProxy = await nursery.start(FaultProxy(("127.0.0.1", echo.port)).serve)
    return started


async def round_trip(stream: trio.SocketStream, data: bytes, *, within: float = 5.0) -> bytes:
    await stream.send_all(data)
    got = b""
    with trio.fail_after(within):
        while len(got) < len(data):
            chunk = await stream.receive_some(65536)
            assert chunk, "the connection ended"
            got += chunk
    return got


async def ended(stream: trio.SocketStream, *, within: float = 5.0) -> None:
    """The proxy ended the connection (EOF or reset) without sending anything."""
    with trio.fail_after(within):
        with contextlib.suppress(trio.BrokenResourceError):
            assert await stream.receive_some(65536) == b""


async def test_pass_through_carries_bytes_both_ways(proxy: FaultProxy, echo: Echo) -> None:
    async with await trio.open_tcp_stream(*proxy.address) as stream:
        payload = bytes(range(256)) * 1000
        assert await round_trip(stream, payload) == payload
    assert echo.received == len(payload)
    assert proxy.accepted == 1 and proxy.bytes_forwarded == 2 * len(payload)


async def test_refuse_new_keeps_existing_connections(proxy: FaultProxy, echo: Echo) -> None:
    async with await trio.open_tcp_stream(*proxy.address) as existing:
        assert await round_trip(existing, b"before") == b"before"
        proxy.refuse_new()
        async with await trio.open_tcp_stream(*proxy.address) as fresh:
            await ended(fresh)
        assert await round_trip(existing, b"after") == b"after"
    assert echo.connections == 1 and proxy.refused == 1


async def test_cut_resets_existing_and_refuses_new_until_passed_again(
    proxy: FaultProxy, echo: Echo
) -> None:
    async with await trio.open_tcp_stream(*proxy.address) as existing:
        assert await round_trip(existing, b"hello") == b"hello"
        proxy.cut()
        await ended(existing)
    async with await trio.open_tcp_stream(*proxy.address) as refused:
        await ended(refused)
    assert echo.connections == 1
    assert proxy.cut_connections == 1 and proxy.refused == 1
    proxy.pass_through()
    async with await trio.open_tcp_stream(*proxy.address) as again:
        assert await round_trip(again, b"back") == b"back"
    assert echo.connections == 2


async def test_delay_holds_every_chunk_each_way(proxy: FaultProxy) -> None:
    async with await trio.open_tcp_stream(*proxy.address) as stream:
        start = trio.current_time()
        await round_trip(stream, b"fast")
        assert trio.current_time() - start < 0.2
        proxy.delay(0.3)
        start = trio.current_time()
        assert await round_trip(stream, b"slow") == b"slow"
        # Held once on the way there and once on the way back.
        assert trio.current_time() - start >= 0.6
        with pytest.raises(ValueError, match="negative"):
            proxy.delay(-1)


async def test_black_hole_swallows_bytes_until_passed_again(proxy: FaultProxy, echo: Echo) -> None:
    async with await trio.open_tcp_stream(*proxy.address) as stream:
        assert await round_trip(stream, b"one") == b"one"
        proxy.black_hole()
        await stream.send_all(b"lost")
        with trio.move_on_after(QUIET):
            await stream.receive_some(65536)
            raise AssertionError("a black hole answered")
        assert echo.received == 3
        # A connection opened meanwhile is held open, and reaches nothing.
        async with await trio.open_tcp_stream(*proxy.address) as held:
            await held.send_all(b"nowhere")
            with trio.move_on_after(QUIET):
                await held.receive_some(65536)
                raise AssertionError("a black hole answered")
            assert echo.connections == 1
            proxy.pass_through()
            # What was sent into the hole is gone; what is sent now flows, on both connections.
            assert await round_trip(stream, b"two") == b"two"
            assert await round_trip(held, b"three") == b"three"
    assert echo.connections == 2 and echo.received == 3 + 3 + 5


async def test_connections_beyond_the_bound_are_closed_at_once(
    nursery: trio.Nursery, echo: Echo
) -> None:
    proxy: FaultProxy = await nursery.start(
        FaultProxy(("127.0.0.1", echo.port), max_connections=2).serve
    )
    async with (
        await trio.open_tcp_stream(*proxy.address) as first,
        await trio.open_tcp_stream(*proxy.address) as second,
    ):
        assert await round_trip(first, b"a") == b"a"
        assert await round_trip(second, b"b") == b"b"
        async with await trio.open_tcp_stream(*proxy.address) as third:
            await ended(third)
        assert proxy.refused == 1 and proxy.live_connections == 2


async def test_a_delay_buffer_is_bounded(nursery: trio.Nursery, echo: Echo) -> None:
    proxy: FaultProxy = await nursery.start(
        FaultProxy(("127.0.0.1", echo.port), max_buffered=65536).serve
    )
    proxy.delay(30)
    async with await trio.open_tcp_stream(*proxy.address) as stream:
        sent = 0
        # The proxy holds at most one chunk per direction plus the sockets' buffers; the
        # sender is held back long before 64 MiB.
        with trio.move_on_after(2):
            while sent < 64 << 20:
                await stream.send_all(b"x" * 65536)
                sent += 65536
        assert sent < 64 << 20
        assert echo.received == 0
