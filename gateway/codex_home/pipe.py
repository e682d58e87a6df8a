"""Bridges between a synchronous worker thread and async byte streams, with bounded buffering.

Packing and unpacking are CPU and disk work, so they run in ``trio.to_thread.run_sync``; the
object store is async. A ``trio`` memory channel of a few chunks joins them: the producer blocks
when the consumer falls behind, so memory stays at ``capacity`` chunks whatever the stream
length. Cancelling the calling task reaches the thread at its next channel operation
(``trio.from_thread.run`` runs in the caller's cancel scope), so neither side outlives it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")
CHANNEL_CAPACITY = 4


def _single_failure(
    group: BaseExceptionGroup[BaseException], stream_error: BaseException | None = None
) -> BaseException | None:
    """The one real error inside a nursery's group (ignoring the cancellations it caused).

    When one side fails, the other may trip over the channel the failing side closed before
    the cancellation reaches it; that broken channel is a consequence, not a second error.
    The thread cannot be cancelled while it works, so it may also fail on its own just after
    the async side did (a restore finds bad data while the download breaks): then the async
    side's error (``stream_error``, the object store's) is the one reported, because the
    thread's may be a consequence of incomplete input — a transfer failure must not be taken
    for a bad archive, nor a stale write for a local problem.
    """
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        elif not isinstance(error, trio.Cancelled):
            leaves.append(error)

    walk(group)
    causes = [
        e for e in leaves if not isinstance(e, trio.BrokenResourceError | trio.ClosedResourceError)
    ]
    if len(causes) == 1:
        return causes[0]
    if stream_error is not None and stream_error in causes:
        return stream_error
    return leaves[0] if len(leaves) == 1 else None


async def consume_in_thread(
    source: AsyncIterable[bytes], consume: Callable[[Callable[[], bytes]], T]
) -> T:
    """Run ``consume(pull)`` in a thread while ``source`` is streamed to it.

    ``pull()`` returns the next chunk, or ``b""`` once ``source`` is exhausted. If ``source``
    fails, its exception is raised here (the thread is cancelled, and never sees a clean end of
    stream it could mistake for a complete archive), even when the thread failed as well. If
    ``consume`` returns before the end,
    the rest of ``source`` is not read.
    """
    send, receive = trio.open_memory_channel[bytes](CHANNEL_CAPACITY)
    source_failure: list[BaseException] = []

    async def produce() -> None:
        try:
            async for chunk in source:
                await send.send(chunk)
        except Exception as exc:
            source_failure.append(exc)
            raise
        # Only a complete stream is closed; a failure propagates instead.
        await send.aclose()

    async def receive_one() -> bytes:
        try:
            return await receive.receive()
        except trio.EndOfChannel:
            return b""

    def pull() -> bytes:
        return trio.from_thread.run(receive_one)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            result = await trio.to_thread.run_sync(consume, pull)
            nursery.cancel_scope.cancel()
        return result
    except BaseExceptionGroup as group:
        single = _single_failure(group, next(iter(source_failure), None))
        if single is None:
            raise
        raise single from None


async def produce_in_thread(
    produce: Callable[[Callable[[bytes], None]], T],
    consume: Callable[[AsyncIterable[bytes]], Awaitable[object]],
) -> tuple[T, object]:
    """Run ``produce(emit)`` in a thread, streaming what it emits into ``consume``.

    The stream ``consume`` receives ends cleanly only when ``produce`` returned; if the
    producer fails, ``consume`` is cancelled instead, so a partial stream is never mistaken for
    a complete one (an upload is abandoned rather than committed). If ``consume`` fails, the
    producer is cancelled at its next ``emit``; if both fail, the consumer's error (the
    store's) is raised. Returns both results.
    """
    send, receive = trio.open_memory_channel[bytes](CHANNEL_CAPACITY)
    produced: list[T] = []
    consume_failure: list[BaseException] = []

    def emit(chunk: bytes) -> None:
        trio.from_thread.run(send.send, chunk)

    async def run_producer() -> None:
        produced.append(await trio.to_thread.run_sync(produce, emit))
        await send.aclose()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_producer)
            async with receive:
                try:
                    consumed = await consume(receive)
                except Exception as exc:
                    consume_failure.append(exc)
                    raise
    except BaseExceptionGroup as group:
        single = _single_failure(group, next(iter(consume_failure), None))
        if single is None:
            raise
        raise single from None
    return produced[0], consumed
