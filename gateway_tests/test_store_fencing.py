"""Both object stores: streaming reads and writes, error classes and conditional writes.

The S3 store runs against moto's server on loopback; every behaviour shown here holds for the
local directory store too, except where a test says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

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
    store = S3ObjectStore(closed_port_settings, max_attempts=1, connect_timeout=2)
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
