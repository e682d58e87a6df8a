"""The object store seam: where CODEX_HOME archives are kept between sessions.

Two implementations: a local directory (the embedded default) and S3. Both speak in whole
objects identified by key, streamed in chunks, with a *generation* token (the S3 ETag, or its
local equivalent) that makes conditional writes possible, so a stale writer cannot overwrite a
newer snapshot.

Errors are deliberately few, because callers act on the class, not on the details:

* ``ObjectNotFound``: nothing stored under the key (a workspace never saved) — start empty.
* ``StoreUnavailable``: unreachable, denied, throttled, misconfigured — retry later / 503.
* ``PreconditionFailed``: a conditional write lost; someone newer owns the object — stop.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

KEY_PREFIX = "codex-app-gateway/"


def archive_key(workspace_id: str) -> str:
    """The object key of a workspace's CODEX_HOME archive (same as the Go service)."""
    return f"{KEY_PREFIX}{workspace_id}.tar.gz"


class StoreError(Exception):
    """Base of every object store failure."""


class ObjectNotFound(StoreError):
    """No object under that key (a workspace that has never been saved)."""


class StoreUnavailable(StoreError):
    """The store could not be reached or refused the request (network, 5xx, access denied)."""


class PreconditionFailed(StoreError):
    """A conditional write lost: the object changed since the writer last saw it."""


class StoreNotFenced(StoreError):
    """The store ignores conditional writes, so a stale writer could overwrite newer history."""


class StoredObject(Protocol):
    """An object being read: its generation and its body as a stream of chunks."""

    @property
    def generation(self) -> str:
        """The generation of exactly the bytes ``chunks`` yields."""
        ...

    @property
    def size(self) -> int | None:
        """The object's length in bytes when the store reports it."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """Yield the body in chunks of bounded size (never the whole object at once)."""
        ...


class ObjectStore(Protocol):
    """Whole-object storage with generations for conditional writes."""

    def describe(self) -> str:
        """A short human description for logs (``s3://bucket`` or ``local:/path``)."""
        ...

    def open_read(self, key: str) -> AbstractAsyncContextManager[StoredObject]:
        """Open ``key`` for reading; raises ``ObjectNotFound`` or ``StoreUnavailable``."""
        ...

    async def write(
        self, key: str, chunks: AsyncIterable[bytes], *, expected_generation: str | None
    ) -> str:
        """Write ``key`` from ``chunks`` and return the new generation.

        ``expected_generation`` is the generation the writer last saw, or ``None`` when the
        writer believes no object exists. If the stored object does not match, raise
        ``PreconditionFailed`` and leave the stored object untouched. The object becomes
        visible whole or not at all; a failed or cancelled write leaves the old one in place.
        ``chunks`` is consumed to the end unless the write fails.
        """
        ...

    async def check(self) -> None:
        """Whether the store can be used at all (bucket exists, directory usable).

        Raises ``StoreUnavailable`` with one sentence naming what is wrong.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class SmallObjects(Protocol):
    """Small JSON-sized objects with conditional writes: what replica mode coordinates with.

    Ownership records and heartbeats are a few hundred bytes; each read returns the body with
    its generation, each write is conditional (``If-None-Match: *`` to create, ``If-Match`` to
    change). A write whose answer was lost (time-out, 5xx, reset) raises ``StoreUnavailable``
    and may have landed all the same: the caller resolves it by reading the object back.
    """

    async def read_small(self, key: str, *, max_bytes: int) -> tuple[bytes, str] | None:
        """The body and generation of ``key``, or ``None`` when there is no object.

        A body over ``max_bytes`` is ``StoreUnavailable`` (nothing of ours is that large).
        """
        ...

    async def write_small(self, key: str, body: bytes, *, expected_generation: str | None) -> str:
        """Write ``body`` under ``key`` if the stored generation is ``expected_generation``.

        ``None`` expects no object. Returns the new generation; raises ``PreconditionFailed``
        (the object is not the expected one) or ``StoreUnavailable`` (outcome unknown).
        """
        ...

    async def list_generations(self, prefix: str, *, limit: int) -> dict[str, str]:
        """Every key under ``prefix`` with its generation, at most ``limit`` of them."""
        ...

    async def copy(self, source: str, target: str, *, metadata: dict[str, str]) -> str:
        """Copy ``source`` to ``target`` inside the store, with ``metadata``; the new generation.

        Raises ``ObjectNotFound`` when ``source`` is missing.
        """
        ...

    async def read_metadata(self, key: str) -> tuple[str, dict[str, str]] | None:
        """The generation and user metadata of ``key``, or ``None`` when there is no object."""
        ...

    async def delete(self, key: str) -> None:
        """Delete ``key`` (no error when it is already gone)."""
        ...


class ReplicaStore(ObjectStore, SmallObjects, Protocol):
    """A store replica mode can run on: archives plus conditional small objects (S3)."""
