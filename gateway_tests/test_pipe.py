"""The thread/async byte pipe reports the one error that caused a failure, unwrapped."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable

import pytest

from gateway.codex_home.pipe import consume_in_thread, produce_in_thread


class ConsumerRefused(Exception):
    """What a store raises when it refuses a write part-way (e.g. a stale generation)."""


def endless_producer(emit: Callable[[bytes], None]) -> None:
    # Keeps emitting until the pipe stops it: the consumer's failure must end it.
    while True:
        emit(b"x" * 1024)


async def refuse_after_first_chunk(chunks: AsyncIterable[bytes]) -> None:
    async for _ in chunks:
        # Refuse while the producer is emitting: its next send finds the channel closed
        # before the cancellation reaches its thread (a race, hence the repetitions).
        raise ConsumerRefused("stale")


@pytest.mark.parametrize("attempt", range(300))
async def test_a_consumer_failure_surfaces_alone_while_the_producer_is_mid_emit(
    attempt: int,
) -> None:
    with pytest.raises(ConsumerRefused):
        await produce_in_thread(endless_producer, refuse_after_first_chunk)


class StoreBroke(Exception):
    """What a store's stream raises when the transfer fails midway."""


class ThreadRefused(Exception):
    """What the thread raises on its own, about the data it already had."""


async def test_when_both_sides_fail_the_stores_error_is_the_one_raised() -> None:
    # The download breaks just as the unpacker, holding a chunk already, refuses it: the
    # refusal may be a consequence of the broken transfer, so the store's error is raised.
    source_failed = threading.Event()

    async def breaking_source() -> AsyncIterator[bytes]:
        yield b"chunk"
        source_failed.set()
        raise StoreBroke("connection reset")

    def refuse_after_the_failure(pull: Callable[[], bytes]) -> None:
        assert pull() == b"chunk"
        assert source_failed.wait(10)
        raise ThreadRefused("bad data")

    with pytest.raises(StoreBroke):
        await consume_in_thread(breaking_source(), refuse_after_the_failure)

    # The other direction: the upload refuses while the packer fails on its own.
    consumer_failed = threading.Event()

    def failing_producer(emit: Callable[[bytes], None]) -> None:
        emit(b"chunk")
        assert consumer_failed.wait(10)
        raise ThreadRefused("a file vanished")

    async def refusing_upload(chunks: AsyncIterable[bytes]) -> None:
        async for _ in chunks:
            consumer_failed.set()
            raise StoreBroke("stale generation")

    with pytest.raises(StoreBroke):
        await produce_in_thread(failing_producer, refusing_upload)
