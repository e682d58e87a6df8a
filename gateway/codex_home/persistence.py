"""Restore and save a workspace's CODEX_HOME through the object store.

This is the one facade sessions use: ``restore`` before the child starts, ``save`` at each
checkpoint and at stop. It owns archive format, safety checks and fencing.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import attrs
import trio

from gateway.config import RestoreLimits
from gateway.store.base import ObjectNotFound, ObjectStore, archive_key


class PersistenceError(Exception):
    """Restoring or saving a CODEX_HOME failed; the message names the object key."""


class HostileArchive(PersistenceError):
    """A stored archive breaks the safety rules; it is refused and left untouched."""


@attrs.frozen
class Generation:
    """What a session knows about the stored archive: its generation (None: no object)."""

    stored: str | None


class Persistence:
    """Restores and saves CODEX_HOME directories as ``codex-app-gateway/<ws>.tar.gz``."""

    def __init__(self, store: ObjectStore, limits: RestoreLimits) -> None:
        self.store = store
        self.limits = limits

    async def restore(self, workspace_id: str, codex_home: Path) -> Generation:
        """Fill the empty directory ``codex_home`` from the stored archive, if there is one."""
        key = archive_key(workspace_id)
        try:
            async with self.store.open_read(key) as stored:
                body = b"".join([chunk async for chunk in stored.chunks()])
                generation = stored.generation
        except ObjectNotFound:
            return Generation(stored=None)

        def extract() -> None:
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
                archive.extractall(codex_home, filter="data")

        await trio.to_thread.run_sync(extract)
        return Generation(stored=generation)

    async def save(self, workspace_id: str, codex_home: Path, expected: Generation) -> Generation:
        """Archive ``codex_home`` and write it, conditional on ``expected``."""
        key = archive_key(workspace_id)

        def pack() -> bytes:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
                for path in sorted(codex_home.rglob("*")):
                    archive.add(path, arcname=str(path.relative_to(codex_home)), recursive=False)
            return buffer.getvalue()

        body = await trio.to_thread.run_sync(pack)

        async def chunks():  # type: ignore[no-untyped-def]
            yield body

        generation = await self.store.write(key, chunks(), expected_generation=expected.stored)
        return Generation(stored=generation)
