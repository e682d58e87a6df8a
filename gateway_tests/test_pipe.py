"""The thread/async byte pipe reports the one error that caused a failure, unwrapped."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable

import pytest

from gateway.codex_home.pipe import produce_in_thread


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
