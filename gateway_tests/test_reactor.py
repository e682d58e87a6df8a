"""The reactor: one epoll set, handlers run in its task, waiters woken only when needed.

Real socket pairs; every wait is bounded by a timeout and waits for an event, not a sleep.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from gateway.sessions.reactor import Reactor

TIMEOUT = 10.0


@pytest.fixture
async def reactor(nursery: trio.Nursery) -> AsyncIterator[Reactor]:
    running = Reactor()
    await nursery.start(running.run)
    yield running
    running.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)
    return left, right


async def test_a_handler_that_keeps_up_serves_every_read_without_waking_its_waiter(
    reactor: Reactor,
) -> None:
    reader, writer = _pair()
    seen: list[bytes] = []
    enough = trio.Event()

    def on_ready() -> bool:
        seen.append(reader.recv(100))
        if len(seen) == 3:
            enough.set()
        return True

    woken = False

    async def wait() -> None:
        nonlocal woken
        await reactor.wait_readable(reader.fileno(), on_ready)
        woken = True

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await wait_all_tasks_blocked()
            for chunk in (b"a", b"b", b"c"):
                writer.send(chunk)
                await wait_all_tasks_blocked()
            await enough.wait()
            assert seen == [b"a", b"b", b"c"] and not woken and reactor.handled == 3
            nursery.cancel_scope.cancel()
    # The cancelled wait left the set: a new one on the same descriptor is served again.
    writer.send(b"d")
    with trio.fail_after(TIMEOUT):
        await reactor.wait_readable(reader.fileno(), lambda: False)
    assert reader.recv(100) == b"d"
    reader.close()
    writer.close()


async def test_a_handler_that_gives_up_wakes_its_waiter_and_is_not_called_again(
    reactor: Reactor,
) -> None:
    reader, writer = _pair()
    calls = 0

    def on_ready() -> bool:
        nonlocal calls
        calls += 1
        return False  # leaves the byte unread for the waiter

    writer.send(b"x")
    with trio.fail_after(TIMEOUT):
        await reactor.wait_readable(reader.fileno(), on_ready)
    # Level-triggered and still unread, yet the handler ran once: the socket left the set.
    await wait_all_tasks_blocked()
    assert calls == 1
    assert reader.recv(1) == b"x"
    reader.close()
    writer.close()


async def test_what_a_handler_raises_is_raised_in_its_waiter(reactor: Reactor) -> None:
    reader, writer = _pair()

    def on_ready() -> bool:
        raise ValueError("broken frame")

    writer.send(b"x")
    with trio.fail_after(TIMEOUT), pytest.raises(ValueError, match="broken frame"):
        await reactor.wait_readable(reader.fileno(), on_ready)
    reader.close()
    writer.close()


async def test_a_handler_that_cancels_its_own_waiter_leaves_it_cancelled_once(
    reactor: Reactor,
) -> None:
    reader, writer = _pair()
    scope = trio.CancelScope()

    def on_ready() -> bool:
        reader.recv(1)
        scope.cancel()  # as a relay does when the other side is gone
        return False

    writer.send(b"x")
    with trio.fail_after(TIMEOUT):
        with scope:
            await reactor.wait_readable(reader.fileno(), on_ready)
        assert scope.cancelled_caught
        # The reactor goes on serving others.
        writer.send(b"y")
        await reactor.wait_readable(reader.fileno(), lambda: False)
    reader.close()
    writer.close()


async def test_one_pass_serves_every_ready_socket(reactor: Reactor) -> None:
    pairs = [_pair() for _ in range(50)]
    served = 0
    all_served = trio.Event()

    def handler(sock: socket.socket) -> bool:
        nonlocal served
        sock.recv(10)
        served += 1
        if served == len(pairs):
            all_served.set()
        return True

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for reader, _ in pairs:
                nursery.start_soon(
                    reactor.wait_readable, reader.fileno(), lambda r=reader: handler(r)
                )
            await wait_all_tasks_blocked()
            passes_before = reactor.passes
            for _, writer in pairs:
                writer.send(b"m")
            await all_served.wait()
            # All 50 were ready together: far fewer passes than sockets.
            assert reactor.passes - passes_before < 10
            nursery.cancel_scope.cancel()
    for reader, writer in pairs:
        reader.close()
        writer.close()


async def test_after_close_waiters_fall_back_to_trios_own_waits(nursery: trio.Nursery) -> None:
    reactor = Reactor()
    reader, writer = _pair()
    # Before the loop runs: Trio's wait, the handler is never called.
    writer.send(b"a")
    with trio.fail_after(TIMEOUT):
        await reactor.wait_readable(reader.fileno(), lambda: pytest.fail("not running yet"))
    reader.recv(1)
    await nursery.start(reactor.run)
    assert reactor.running
    woken = trio.Event()

    async def wait() -> None:
        await reactor.wait_readable(reader.fileno(), lambda: pytest.fail("closed"))
        woken.set()

    nursery.start_soon(wait)
    await wait_all_tasks_blocked()
    reactor.close()
    with trio.fail_after(TIMEOUT):
        await woken.wait()  # the waiter was handed back when the loop ended
    assert not reactor.running
    writer.send(b"b")
    with trio.fail_after(TIMEOUT):
        await reactor.wait_readable(reader.fileno(), lambda: pytest.fail("closed"))
    assert reader.recv(1) == b"b"
    reader.close()
    writer.close()
