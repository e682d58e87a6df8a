"""Ownership records and heartbeats: the codec (hostile bodies refused) and the conditional
writes against moto, including writes whose answer is lost on the way back."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from gateway.config import S3Settings
from gateway.replicas.records import (
    MAX_RECORD_BYTES,
    Heartbeat,
    OwnershipRecord,
    OwnerState,
    RecordError,
    Records,
    Superseded,
    decode_heartbeat,
    decode_record,
    encode_heartbeat,
    encode_record,
    new_write_id,
    owner_key,
    pod_of_heartbeat_key,
)
from gateway.store.base import PreconditionFailed, StoreUnavailable
from gateway.store.s3 import S3ObjectStore
from gateway_tests.reliability.support import CuttableProxy
from gateway_tests.s3_server import MotoServer, settings_for

KEY = owner_key("ws-1")


def record(**changes: Any) -> OwnershipRecord:
    """A plausible record, with ``changes``."""
    base = OwnershipRecord(
        pod="pod-a",
        peer_addr="10.0.0.1:8087",
        incarnation="inc-a",
        epoch=1,
        state=OwnerState.OWNED,
        committed=None,
        legacy_seen=None,
        write_id=new_write_id(),
    )
    return attrs.evolve(base, **changes)


def test_record_and_heartbeat_round_trip() -> None:
    owned = record(committed="codex-app-gateway/.snapshots/ws-1/1-x.tar.gz", legacy_seen='"e"')
    assert decode_record(encode_record(owned), KEY) == owned
    released = attrs.evolve(owned, state=OwnerState.RELEASED, epoch=7)
    assert decode_record(encode_record(released), KEY) == released
    beat = Heartbeat("pod-a", "inc", "10.0.0.1:8087", 3, True, False, "w")
    assert decode_heartbeat(encode_heartbeat(beat), "k") == beat


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"v": 2}',
        json.dumps({**json.loads(encode_record(record())), "epoch": True}).encode(),
        json.dumps({**json.loads(encode_record(record())), "epoch": 0}).encode(),
        json.dumps({**json.loads(encode_record(record())), "epoch": "1"}).encode(),
        json.dumps({**json.loads(encode_record(record())), "state": "stolen"}).encode(),
        json.dumps({**json.loads(encode_record(record())), "pod": None}).encode(),
        json.dumps(
            {k: v for k, v in json.loads(encode_record(record())).items() if k != "write_id"}
        ).encode(),
    ],
)
def test_a_broken_record_is_refused_with_its_key(body: bytes) -> None:
    with pytest.raises(RecordError, match=re.escape(KEY)):
        decode_record(body, KEY)


def test_heartbeat_counter_must_be_a_number() -> None:
    beat = json.loads(encode_heartbeat(Heartbeat("p", "i", "a:1", 1, False, False, "w")))
    beat["counter"] = False
    with pytest.raises(RecordError, match="counter"):
        decode_heartbeat(json.dumps(beat).encode(), "k")


def test_heartbeat_keys_name_their_pod() -> None:
    assert pod_of_heartbeat_key("codex-app-gateway/.pods/pod-a.json") == "pod-a"
    assert pod_of_heartbeat_key("codex-app-gateway/.pods/.json") is None
    assert pod_of_heartbeat_key("codex-app-gateway/ws.tar.gz") is None


@pytest.fixture
async def records(s3_settings: S3Settings) -> AsyncIterator[Records]:
    store = S3ObjectStore(s3_settings, max_attempts=1, timeout=5)
    yield Records(store)
    await store.aclose()


async def test_create_is_exclusive_and_change_needs_the_etag(records: Records) -> None:
    first = record()
    etag = await records.write_owner("ws-1", first, expected=None)
    with pytest.raises(Superseded) as lost:
        await records.write_owner("ws-1", record(pod="pod-b"), expected=None)
    assert lost.value.current is not None and lost.value.current.value == first

    moved = record(epoch=2, pod="pod-b")
    new_etag = await records.write_owner("ws-1", moved, expected=etag)
    with pytest.raises(PreconditionFailed):
        # The stale holder of the first ETag cannot change it any more.
        await records.write_owner("ws-1", record(epoch=2), expected=etag)
    found = await records.read_owner("ws-1")
    assert found is not None and found.value == moved and found.etag == new_etag


async def test_an_oversized_object_is_not_read_as_a_record(
    records: Records, moto_server: MotoServer, s3_settings: S3Settings
) -> None:
    moto_server.boto_client().put_object(
        Bucket=s3_settings.bucket, Key=KEY, Body=b"x" * (MAX_RECORD_BYTES + 1)
    )
    with pytest.raises(StoreUnavailable, match="bytes"):
        await records.read_owner("ws-1")


@pytest.fixture
async def lossy(nursery: trio.Nursery, moto_server: MotoServer) -> CuttableProxy:
    host, port = moto_server.endpoint.removeprefix("http://").split(":")
    proxy = CuttableProxy(host, int(port))
    await nursery.start(proxy.serve)
    return proxy


@pytest.mark.parametrize("attempts", [1, 3])
async def test_a_write_whose_answer_is_lost_is_settled_by_its_write_id(
    lossy: CuttableProxy, s3_settings: S3Settings, attempts: int
) -> None:
    """One attempt: no answer, read back. Three: the retry gets 412 from its own first try."""
    direct = Records(S3ObjectStore(s3_settings, max_attempts=1))
    store = S3ObjectStore(settings_for(lossy.url, s3_settings.bucket), max_attempts=attempts)
    try:
        records = Records(store)
        ours = record()
        lossy.lose_answers, lossy.answers_to_lose = True, 1
        etag = await records.write_owner("ws-1", ours, expected=None)
        assert lossy.answers_lost == 1
        found = await direct.read_owner("ws-1")
        assert found is not None and found.value == ours and found.etag == etag
    finally:
        await store.aclose()
        await direct.store.aclose()  # type: ignore[attr-defined]


async def test_a_lost_answer_of_a_write_that_lost_the_race_is_superseded(
    lossy: CuttableProxy, s3_settings: S3Settings
) -> None:
    direct = Records(S3ObjectStore(s3_settings, max_attempts=1))
    store = S3ObjectStore(settings_for(lossy.url, s3_settings.bucket), max_attempts=1)
    try:
        etag = await direct.write_owner("ws-1", record(), expected=None)
        theirs = record(pod="pod-b", epoch=2)
        await direct.write_owner("ws-1", theirs, expected=etag)
        lossy.lose_answers, lossy.answers_to_lose = True, 1
        with pytest.raises(Superseded) as lost:
            await Records(store).write_owner("ws-1", record(epoch=2), expected=etag)
        assert lost.value.current is not None and lost.value.current.value == theirs
    finally:
        await store.aclose()
        await direct.store.aclose()  # type: ignore[attr-defined]
