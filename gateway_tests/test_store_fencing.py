"""Both object stores: streaming reads and writes, error classes and conditional writes.

The S3 store runs against moto's server on loopback; every behaviour shown here holds for the
local directory store too, except where a test says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from gateway.config import S3Settings, Secret
from gateway.store.base import (
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)
from gateway.store.local import LocalDirectoryStore
from gateway.store.s3 import MIN_PART_SIZE, S3ObjectStore
from gateway_tests.s3_server import BUCKET, MotoServer

KEY = "codex-app-gateway/ws-1.tar.gz"


@pytest.fixture(params=["s3", "local"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    """Each store kind in turn (S3 with the smallest legal part size, to exercise multipart)."""
    if request.param == "s3":
        settings = request.getfixturevalue("s3_settings")
        s3 = S3ObjectStore(settings, part_size=MIN_PART_SIZE, max_attempts=1)
        yield s3
        await s3.aclose()
    else:
        yield LocalDirectoryStore(tmp_path / "store")


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """``data`` as an async stream of chunks."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def read_all(store: ObjectStore, key: str = KEY) -> tuple[str, bytes]:
    """The generation and body of ``key``."""
    async with store.open_read(key) as stored:
        return stored.generation, b"".join([chunk async for chunk in stored.chunks()])


async def test_missing_object_is_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        await read_all(store)


@pytest.mark.parametrize("size", [0, 1000, 2 * MIN_PART_SIZE + 12345])
async def test_round_trip_small_and_multipart(store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    generation = await store.write(KEY, chunks_of(data), expected_generation=None)
    stored_generation, body = await read_all(store)
    assert body == data
    assert stored_generation == generation


async def test_reads_stream_in_bounded_chunks(store: ObjectStore) -> None:
    await store.write(KEY, chunks_of(os.urandom(3 << 20)), expected_generation=None)
    async with store.open_read(KEY) as stored:
        sizes = [len(chunk) async for chunk in stored.chunks()]
    assert len(sizes) > 4
    assert max(sizes) <= 1 << 20


@pytest.mark.parametrize("size", [1000, 2 * MIN_PART_SIZE])
async def test_stale_writer_is_rejected_and_newer_object_survives(
    store: ObjectStore, size: int
) -> None:
    first = await store.write(KEY, chunks_of(b"first"), expected_generation=None)
    newer = await store.write(KEY, chunks_of(b"newer"), expected_generation=first)
    # A writer that still holds the first generation (a zombie session) and one that thinks
    # there is no object yet (a second pod that started empty) both lose.
    for stale in (first, None):
        with pytest.raises(PreconditionFailed):
            await store.write(KEY, chunks_of(os.urandom(size)), expected_generation=stale)
    assert await read_all(store) == (newer, b"newer")


async def test_writer_expecting_a_deleted_object_is_rejected(
    store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    first = await store.write(KEY, chunks_of(b"first"), expected_generation=None)
    if isinstance(store, S3ObjectStore):
        request.getfixturevalue("moto_server").boto_client().delete_object(Bucket=BUCKET, Key=KEY)
    else:
        (tmp_path / "store" / KEY).unlink()
    with pytest.raises(PreconditionFailed):
        await store.write(KEY, chunks_of(b"late"), expected_generation=first)


async def test_write_racing_a_long_upload_wins(store: ObjectStore) -> None:
    """A newer snapshot stored while a multipart upload runs is not overwritten by it.

    On S3 the check before completion catches it (moto ignores the condition on
    CompleteMultipartUpload itself); on the local store, the check under the lock.
    """
    first = await store.write(KEY, chunks_of(b"first"), expected_generation=None)
    raced: list[str] = []

    async def slow_upload() -> AsyncIterator[bytes]:
        payload = os.urandom(MIN_PART_SIZE + 1024)
        yield payload[: MIN_PART_SIZE // 2]
        yield payload[MIN_PART_SIZE // 2 : MIN_PART_SIZE + 10]
        # Part one is on its way; now another writer stores a newer snapshot.
        raced.append(await store.write(KEY, chunks_of(b"racer"), expected_generation=first))
        yield payload[MIN_PART_SIZE + 10 :]

    with pytest.raises(PreconditionFailed):
        await store.write(KEY, slow_upload(), expected_generation=first)
    assert await read_all(store) == (raced[0], b"racer")


async def test_failed_source_leaves_the_old_object(store: ObjectStore) -> None:
    first = await store.write(KEY, chunks_of(b"first"), expected_generation=None)

    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(MIN_PART_SIZE + 1)
        raise RuntimeError("the packer failed")

    with pytest.raises(RuntimeError):
        await store.write(KEY, broken(), expected_generation=first)
    assert await read_all(store) == (first, b"first")


async def test_cancelled_write_leaves_the_old_object(store: ObjectStore) -> None:
    first = await store.write(KEY, chunks_of(b"first"), expected_generation=None)
    started = trio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield os.urandom(1 << 20)
            started.set()

    async with trio.open_nursery() as nursery:

        async def write() -> None:
            await store.write(KEY, endless(), expected_generation=first)

        nursery.start_soon(write)
        await started.wait()
        nursery.cancel_scope.cancel()
    assert await read_all(store) == (first, b"first")


def _bucket_uploads(server: MotoServer) -> list[object]:
    return server.boto_client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


async def test_abandoned_multipart_uploads_are_aborted(
    s3_settings: S3Settings,
    moto_server: MotoServer,
) -> None:
    store = S3ObjectStore(s3_settings, part_size=MIN_PART_SIZE)

    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(MIN_PART_SIZE + 1)
        yield os.urandom(10)
        raise RuntimeError("the packer failed")

    with pytest.raises(RuntimeError):
        await store.write(KEY, broken(), expected_generation=None)
    assert _bucket_uploads(moto_server) == []
    await store.aclose()


async def test_unreachable_s3_is_unavailable_with_a_clear_message(
    closed_port_settings: S3Settings,
) -> None:
    store = S3ObjectStore(closed_port_settings, max_attempts=1, timeout=2)
    with pytest.raises(StoreUnavailable, match=rf"s3://{BUCKET}/{KEY}.*unreachable"):
        await read_all(store)
    with pytest.raises(StoreUnavailable, match=rf"s3://{BUCKET}/{KEY}"):
        await store.write(KEY, chunks_of(b"x"), expected_generation=None)
    await store.aclose()


async def test_missing_bucket_is_unavailable_not_empty(moto_server: MotoServer) -> None:
    """A misconfigured bucket must never read as "no archive yet" (that would start empty)."""
    moto_server.reset()
    settings = S3Settings(
        bucket="no-such-bucket",
        endpoint=moto_server.endpoint,
        region="us-east-1",
        access_key_id="test",
        secret_access_key=Secret("test"),
        path_style=True,
    )
    store = S3ObjectStore(settings, max_attempts=1)
    with pytest.raises(StoreUnavailable, match="NoSuchBucket"):
        await read_all(store)
    await store.aclose()


async def test_local_store_rejects_keys_outside_its_root(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    with pytest.raises(StoreError, match="invalid object key"):
        await store.write("../escape", chunks_of(b"x"), expected_generation=None)


# --- what a cancelled write leaves behind ---------------------------------------------------


class RequestGate:
    """A loopback proxy to moto that holds the ``n``-th request whose bytes contain ``marker``.

    The held request never reaches moto; ``held`` is set when it arrives, so a test can cancel
    the writer exactly while that request is in flight. Every other request passes, unless
    ``hold_all``: then every request from the ``n``-th on is held (a store that went silent).
    """

    def __init__(self, target: str, marker: bytes, n: int = 1, *, hold_all: bool = False) -> None:
        host, port = target.removeprefix("http://").split(":")
        self._target = (host, int(port))
        self._marker = marker
        self._remaining = n
        self.held = trio.Event()
        # How many requests (or, for StallingResponses, responses) were held so far.
        self.holds = 0
        self.endpoint = ""
        self._hold_all = hold_all

    async def serve(self, *, task_status: trio.TaskStatus[RequestGate]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.endpoint = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._relay, listeners, handler_nursery=nursery)

    async def _relay(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(*self._target)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._forward_requests, client, upstream, nursery.cancel_scope)
            nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)

    async def _forward_requests(
        self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if self._marker in data and (self._hold_all or not self.held.is_set()):
                    self._remaining -= 1
                    if self._remaining <= 0:
                        self.holds += 1
                        self.held.set()
                        await trio.sleep_forever()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            done.cancel()


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.cancel()


def _stalling_source(parts: int, stalled: trio.Event) -> AsyncIterator[bytes]:
    """``parts`` parts' worth of data, then a source that never ends (a packer still busy)."""

    async def source() -> AsyncIterator[bytes]:
        for _ in range(parts):
            yield os.urandom(MIN_PART_SIZE)
        yield os.urandom(10)
        stalled.set()
        await trio.sleep_forever()
        yield b""  # pragma: no cover - never reached

    return source()


@pytest.mark.parametrize(
    ("point", "marker", "nth", "parts"),
    [
        # The upload exists; its first part is still being filled by the packer.
        ("created, waiting for data", None, 0, 1),
        # The packer is busy after a first part went up.
        ("one part up, waiting for data", None, 0, 2),
        # A part is on the wire.
        ("during UploadPart", b"partNumber=1", 1, 2),
        # Every part is up; the writer checks the stored generation before completing.
        ("during the check before completing", b"HEAD ", 2, 2),
        # The completion itself is on the wire.
        ("during CompleteMultipartUpload", b"POST ", 2, 2),
    ],
)
async def test_a_cancelled_multipart_write_leaves_no_upload(
    point: str,
    marker: bytes | None,
    nth: int,
    parts: int,
    nursery: trio.Nursery,
    s3_settings: S3Settings,
    moto_server: MotoServer,
) -> None:
    gate = RequestGate(moto_server.endpoint, marker or b"\x00never\x00", max(nth, 1))
    await nursery.start(gate.serve)
    settings = attrs.evolve(s3_settings, endpoint=gate.endpoint)
    store = S3ObjectStore(settings, part_size=MIN_PART_SIZE, max_attempts=1, timeout=5)
    stalled = trio.Event()
    if marker is None:
        source = _stalling_source(parts, stalled)
        reached = stalled
    else:

        async def finite() -> AsyncIterator[bytes]:
            for _ in range(parts):
                yield os.urandom(MIN_PART_SIZE)

        source = finite()
        reached = gate.held
    with trio.fail_after(30):
        async with trio.open_nursery() as writers:

            async def write() -> None:
                await store.write(KEY, source, expected_generation=None)

            writers.start_soon(write)
            await reached.wait()
            writers.cancel_scope.cancel()
    assert _bucket_uploads(moto_server) == [], point
    assert "Contents" not in moto_server.boto_client().list_objects_v2(Bucket=BUCKET), point
    await store.aclose()


@pytest.mark.parametrize("point", ["streaming", "after the last chunk"])
async def test_a_cancelled_local_write_leaves_only_the_objects(point: str, tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path / "store")
    first = await store.write(KEY, chunks_of(b"first"), expected_generation=None)
    stalled = trio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield os.urandom(1 << 20)
        if point == "streaming":
            stalled.set()
            await trio.sleep_forever()

    async def slow_end() -> AsyncIterator[bytes]:
        async for chunk in source():
            yield chunk
        # The whole body is written; the writer's next step is its flush and commit.
        stalled.set()
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as writers:
            body = source() if point == "streaming" else slow_end()

            async def write() -> None:
                await store.write(KEY, body, expected_generation=first)

            writers.start_soon(write)
            await stalled.wait()
            writers.cancel_scope.cancel()
    everything = sorted(
        str(path.relative_to(tmp_path / "store")) for path in (tmp_path / "store").rglob("*")
    )
    assert everything == ["codex-app-gateway", KEY]
    assert await read_all(store) == (first, b"first")


class StallingResponses(RequestGate):
    """A proxy to moto that passes requests but stops each response after ``limit`` bytes."""

    def __init__(self, target: str, limit: int) -> None:
        super().__init__(target, b"\x00never\x00")
        self._limit = limit

    async def _relay(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(*self._target)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(self._stall_after_limit, upstream, client)

    async def _stall_after_limit(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        sent = 0
        while sent < self._limit and (data := await source.receive_some(self._limit - sent)):
            await sink.send_all(data)
            sent += len(data)
        self.holds += 1
        self.held.set()
        await trio.sleep_forever()


async def test_every_s3_call_is_bounded_by_the_timeout(
    nursery: trio.Nursery,
    s3_settings: S3Settings,
    moto_server: MotoServer,
) -> None:
    direct = S3ObjectStore(s3_settings, max_attempts=1)
    await direct.write(KEY, chunks_of(os.urandom(1 << 20)), expected_generation=None)
    await direct.aclose()

    # A body that stops arriving: the read fails after one timeout without data.
    stalling = StallingResponses(moto_server.endpoint, limit=64 * 1024)
    await nursery.start(stalling.serve)
    store = S3ObjectStore(
        attrs.evolve(s3_settings, endpoint=stalling.endpoint, timeout=1.0), max_attempts=3
    )
    started = trio.current_time()
    with trio.fail_after(5), pytest.raises(StoreUnavailable, match="stalled: no data for 1 s"):
        await read_all(store)
    # One timeout's wait, for one stalled body: a stalled read is not retried. (The count, not
    # an upper bound on the time, tells one wait from several on a busy machine.)
    assert trio.current_time() - started >= 1.0
    assert stalling.holds == 1
    await store.aclose()

    # Requests whose answers never come: each fails after the timeout (plus its data's time),
    # retries included.
    silent = RequestGate(moto_server.endpoint, b" http", hold_all=True)
    await nursery.start(silent.serve)
    store = S3ObjectStore(
        attrs.evolve(s3_settings, endpoint=silent.endpoint, timeout=1.0),
        part_size=MIN_PART_SIZE,
        max_attempts=3,
    )
    for attempt in (
        read_all(store),
        store.write(KEY, chunks_of(b"small"), expected_generation=None),
    ):
        held_before = silent.holds
        started = trio.current_time()
        with trio.fail_after(5), pytest.raises(StoreUnavailable, match="no answer within 1 s"):
            await attempt
        assert trio.current_time() - started >= 1.0
        # One request waited for, not one per allowed attempt: no retry after a time-out.
        assert silent.holds - held_before == 1
    await store.aclose()
