"""Replica mode's small objects in the bucket: ownership records and pod heartbeats.

Layout (all under the archive prefix ``codex-app-gateway/``; the workspace id is used exactly as
in ``archive_key``):

* ``.owners/<ws>.json``: who owns a workspace (``OwnershipRecord``), changed only by conditional
  writes — ``If-None-Match: *`` to create, ``If-Match: <etag>`` to change;
* ``.pods/<pod>.json``: one heartbeat per pod (``Heartbeat``), rewritten every heartbeat
  interval, also conditionally (a second process writing the same pod name is noticed);
* ``.snapshots/<ws>/<epoch>-<id>.tar.gz``: snapshots written by replica-mode saves under keys
  nobody else writes; the record names the committed one (``gateway/replicas/snapshots.py``).

The codecs are pure functions; ``Records`` does the conditional reads and writes. Every write
carries a fresh ``write_id``: a write whose answer was lost (time-out, 5xx, reset) or a retried
request that finds its own first attempt (412) is resolved by reading the object back and
comparing write ids, never by guessing.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs

from gateway.store.base import KEY_PREFIX, PreconditionFailed, SmallObjects, StoreUnavailable

OWNERS_PREFIX = f"{KEY_PREFIX}.owners/"
PODS_PREFIX = f"{KEY_PREFIX}.pods/"
SNAPSHOTS_PREFIX = f"{KEY_PREFIX}.snapshots/"
# A record or heartbeat is a few hundred bytes; anything far larger is not ours.
MAX_RECORD_BYTES = 8192
FORMAT_VERSION = 1


def owner_key(workspace_id: str) -> str:
    """The key of a workspace's ownership record."""
    return f"{OWNERS_PREFIX}{workspace_id}.json"


def heartbeat_key(pod: str) -> str:
    """The key of a pod's heartbeat."""
    return f"{PODS_PREFIX}{pod}.json"


def pod_of_heartbeat_key(key: str) -> str | None:
    """The pod a heartbeat key names, or ``None`` for any other key."""
    if not key.startswith(PODS_PREFIX) or not key.endswith(".json"):
        return None
    return key[len(PODS_PREFIX) : -len(".json")] or None


def snapshot_key(workspace_id: str, epoch: int, write_id: str) -> str:
    """A fresh key for one snapshot of ``workspace_id`` taken at ``epoch``."""
    return f"{SNAPSHOTS_PREFIX}{workspace_id}/{epoch:012d}-{write_id}.tar.gz"


def new_write_id() -> str:
    """A random id naming one write (or one daemon start, as an incarnation)."""
    return secrets.token_hex(8)


class RecordError(StoreUnavailable):
    """A stored record or heartbeat is not one this gateway can read; the message names it."""


class OwnerState(enum.Enum):
    """Whether a record's pod still holds the workspace."""

    OWNED = "owned"
    # Saved and let go (idle stop, drain): the next claim anywhere takes it at once.
    RELEASED = "released"


@attrs.frozen
class OwnershipRecord:
    """Who owns a workspace, at which epoch, and which snapshot is its committed one."""

    pod: str
    peer_addr: str
    # The owning daemon process (random per start): a restarted pod is a new incarnation.
    incarnation: str
    # Raised on every change of owner; a commit names the epoch it was made at.
    epoch: int
    state: OwnerState
    # The snapshot key of the last committed save; None: none yet (restore the legacy key).
    committed: str | None
    # The ETag of the legacy archive whose history this record already contains (the mirror
    # of a commit, or the archive restored at the first claim): anything else found there
    # was written by a single-pod or Go gateway since, and is newer.
    legacy_seen: str | None
    write_id: str


@attrs.frozen
class Heartbeat:
    """One pod's sign of life; peers judge it by when they last saw it change."""

    pod: str
    incarnation: str
    peer_addr: str
    counter: int
    draining: bool
    # Written once by a daemon that stopped cleanly: nothing of this incarnation runs any more.
    stopped: bool
    write_id: str


def encode_record(record: OwnershipRecord) -> bytes:
    """The record as stored (JSON)."""
    data = attrs.asdict(record)
    data["state"] = record.state.value
    data["v"] = FORMAT_VERSION
    return json.dumps(data, sort_keys=True).encode()


def encode_heartbeat(heartbeat: Heartbeat) -> bytes:
    """The heartbeat as stored (JSON)."""
    data = attrs.asdict(heartbeat)
    data["v"] = FORMAT_VERSION
    return json.dumps(data, sort_keys=True).encode()


def _fields(body: bytes, key: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise RecordError(f"{key} is not JSON; delete it to let replica mode rewrite it") from None
    if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
        raise RecordError(f"{key} has an unknown format; delete it to let it be rewritten")
    return data


def _typed(data: dict[str, Any], key: str, name: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(name)
    # bool is an int in Python: a counter or epoch must not be true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(f"{key}: field {name!r} is missing or has the wrong type")
    return value


def decode_record(body: bytes, key: str) -> OwnershipRecord:
    """The record stored under ``key``; ``RecordError`` if it is not a valid one."""
    data = _fields(body, key)
    try:
        state = OwnerState(data.get("state"))
    except ValueError:
        raise RecordError(f"{key}: field 'state' is not owned/released") from None
    epoch = _typed(data, key, "epoch", int)
    if epoch < 1:
        raise RecordError(f"{key}: epoch {epoch} is not positive")
    return OwnershipRecord(
        pod=_typed(data, key, "pod", str),
        peer_addr=_typed(data, key, "peer_addr", str),
        incarnation=_typed(data, key, "incarnation", str),
        epoch=epoch,
        state=state,
        committed=_typed(data, key, "committed", (str, type(None))),
        legacy_seen=_typed(data, key, "legacy_seen", (str, type(None))),
        write_id=_typed(data, key, "write_id", str),
    )


def decode_heartbeat(body: bytes, key: str) -> Heartbeat:
    """The heartbeat stored under ``key``; ``RecordError`` if it is not a valid one."""
    data = _fields(body, key)
    return Heartbeat(
        pod=_typed(data, key, "pod", str),
        incarnation=_typed(data, key, "incarnation", str),
        peer_addr=_typed(data, key, "peer_addr", str),
        counter=_typed(data, key, "counter", int),
        draining=_typed(data, key, "draining", bool),
        stopped=_typed(data, key, "stopped", bool),
        write_id=_typed(data, key, "write_id", str),
    )


T = TypeVar("T", OwnershipRecord, Heartbeat)


@attrs.frozen
class Versioned(Generic[T]):
    """A decoded object and the generation (ETag) it was read at."""

    value: T
    etag: str


class Superseded(PreconditionFailed):
    """A conditional write lost: ``current`` is what the object holds now (None: missing)."""

    def __init__(self, message: str, current: Versioned[Any] | None) -> None:
        super().__init__(message)
        self.current = current


class NoLongerOwner(Superseded):
    """This pod's hold on a workspace ended (another pod took it over); it must not save."""


class Records:
    """Conditional reads and writes of records and heartbeats, with write-id read-back."""

    def __init__(self, store: SmallObjects) -> None:
        self.store = store

    async def read_owner(self, workspace_id: str) -> Versioned[OwnershipRecord] | None:
        """The workspace's record, or ``None`` when it has none."""
        return await self._read(owner_key(workspace_id), decode_record)

    async def read_heartbeat(self, pod: str) -> Versioned[Heartbeat] | None:
        """The pod's heartbeat, or ``None`` when it has none."""
        return await self._read(heartbeat_key(pod), decode_heartbeat)

    async def write_owner(
        self, workspace_id: str, record: OwnershipRecord, *, expected: str | None
    ) -> str:
        """Write ``record`` if the stored one is at ``expected`` (None: no record yet)."""
        return await self._write(
            owner_key(workspace_id), encode_record(record), record.write_id, expected, decode_record
        )

    async def write_heartbeat(self, heartbeat: Heartbeat, *, expected: str | None) -> str:
        """Write this pod's heartbeat if the stored one is at ``expected``."""
        return await self._write(
            heartbeat_key(heartbeat.pod),
            encode_heartbeat(heartbeat),
            heartbeat.write_id,
            expected,
            decode_heartbeat,
        )

    async def _read(self, key: str, decode: Callable[[bytes, str], T]) -> Versioned[T] | None:
        found = await self.store.read_small(key, max_bytes=MAX_RECORD_BYTES)
        if found is None:
            return None
        body, etag = found
        return Versioned(decode(body, key), etag)

    async def _write(
        self,
        key: str,
        body: bytes,
        write_id: str,
        expected: str | None,
        decode: Callable[[bytes, str], T],
    ) -> str:
        """One conditional write, its doubtful outcomes settled by reading the object back.

        * 412: a retried request may have found its own first attempt — ours if the stored
          write id is ours, else ``Superseded`` with what is stored now;
        * no answer (``StoreUnavailable``): ours if the stored write id is ours; still the
          expected object: not written (``StoreUnavailable``, safe to retry); anything else:
          ``Superseded``. A failing read-back leaves it in doubt: ``StoreUnavailable``, and the
          caller keeps ``write_id`` to recognise the write later.
        """
        try:
            return await self.store.write_small(key, body, expected_generation=expected)
        except PreconditionFailed:
            current = await self._read(key, decode)
            if current is not None and current.value.write_id == write_id:
                return current.etag
            raise Superseded(f"{key} changed since generation {expected}", current) from None
        except StoreUnavailable:
            current = await self._read(key, decode)
            if current is not None and current.value.write_id == write_id:
                return current.etag
            if (current.etag if current is not None else None) == expected:
                raise
            raise Superseded(f"{key} changed since generation {expected}", current) from None
