"""The object store seam: where CODEX_HOME archives are kept between sessions.

Two implementations: a local directory (the embedded default) and S3. Both speak in whole
objects identified by key, streamed in chunks, with a *generation* token (the S3 ETag, or its
local equivalent) that makes conditional writes possible, so a stale writer cannot overwrite a
newer snapshot.
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


class StoredObject(Protocol):
    """An object being read: its generation and its body as a stream of chunks."""

    generation: str

    def chunks(self) -> AsyncIterator[bytes]:
        """Yield the body in chunks of bounded size."""
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
        ``PreconditionFailed`` and leave the stored object untouched.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
