"""Commit-fenced saves of replica mode: a snapshot counts once the ownership record names it.

A replica-mode save never overwrites anything: it writes the snapshot under a fresh key of its
own (``.snapshots/<ws>/<epoch>-<id>.tar.gz``, ``If-None-Match: *``), then *commits* it — a
conditional write of the ownership record (``If-Match`` the ETag this pod holds) naming that
key. Only then is it mirrored to the legacy key ``codex-app-gateway/<ws>.tar.gz`` (a copy inside
the store, tagged with the snapshot it mirrors), which therefore always holds a committed
snapshot: a Go or single-pod gateway restores it after a replica run.

Why unique keys: a paused owner whose write lands *after* another pod took the workspace over
— even before the new owner wrote anything — only adds an object nobody reads; its commit gets
412 and the session stops as superseded. Had it written the shared key, it would have replaced
the committed snapshot the new owner restores.

Restore reads the record's committed snapshot. The legacy key is read instead when the record
has committed nothing yet (a Go or single-pod archive adopted on the first claim), or when the
legacy object is neither a mirror (no tag) nor the archive the record already includes
(``legacy_seen``): a single-pod or Go gateway ran in between and wrote newer history.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio

from gateway.codex_home.persistence import (
    Generation,
    Persistence,
    PersistenceError,
    PersistenceUnavailable,
    ReadAs,
    StaleSnapshot,
)
from gateway.replicas.records import NoLongerOwner, new_write_id, snapshot_key
from gateway.store.base import StoreUnavailable, archive_key

if TYPE_CHECKING:
    from gateway.replicas.ownership import StorePlacement

log = structlog.get_logger(__name__)

#: User metadata on the legacy archive naming the committed snapshot it mirrors.
MIRROR_TAG = "cxg-snapshot"
# Deleting superseded snapshots is housekeeping: bounded, and never fails a save.
DELETE_SECONDS = 5.0


class CommittedSnapshots:
    """One session's restore and commit-fenced saves; see the module docstring."""

    def __init__(
        self, placement: StorePlacement, workspace_id: str, epoch: int, persistence: Persistence
    ) -> None:
        self._placement = placement
        self._store = placement.store
        self._workspace_id = workspace_id
        self._epoch = epoch
        self._persistence = persistence
        # The legacy archive's ETag whose history the committed snapshots include.
        self._legacy_seen: str | None = None
        # The snapshot the record names (as far as this session knows).
        self._committed: str | None = None
        # Committed but not yet mirrored (the mirror failed), with the save's generation.
        self._unmirrored: tuple[str, Generation] | None = None
        # Written snapshots that are not (or may not be) the committed one: deleted once a
        # later commit succeeded.
        self._leftovers: set[str] = set()
        self._restored = False

    async def restore(self, codex_home: Path) -> Generation:
        """Fill the empty home from the committed snapshot (or the legacy archive)."""
        record = self._placement.hold(self._workspace_id, self._epoch).record
        legacy = archive_key(self._workspace_id)
        key = record.committed
        try:
            if key is not None:
                found = await self._store.read_metadata(legacy)
                if (
                    found is not None
                    and found[0] != record.legacy_seen
                    and MIRROR_TAG not in found[1]
                ):
                    log.warning("owner.legacy_archive_newer", key=legacy, snapshot=key)
                    key = None
                elif await self._store.read_metadata(key) is None:
                    raise PersistenceError(
                        f"the committed snapshot {key} of workspace {self._workspace_id} is "
                        "missing from the store; nothing was restored"
                    )
        except StoreUnavailable as exc:
            raise PersistenceUnavailable(f"restoring {legacy}: {exc}") from exc
        if key is None:
            generation = await self._persistence.restore(self._workspace_id, codex_home)
            self._legacy_seen = generation.stored
        else:
            generation = await self._persistence.restore(self._workspace_id, codex_home, key=key)
            self._legacy_seen = record.legacy_seen
        self._committed = record.committed
        self._restored = True
        return generation

    async def save(
        self,
        codex_home: Path,
        expected: Generation,
        *,
        read_as: ReadAs | None,
        recorded_home: Path | None,
    ) -> Generation:
        """Write a snapshot under a fresh key and commit it; ``StaleSnapshot`` if refused."""
        try:
            hold = self._placement.hold(self._workspace_id, self._epoch)
        except NoLongerOwner as exc:
            raise StaleSnapshot(f"not saving workspace {self._workspace_id}: {exc}") from exc
        if not self._restored:
            # An adopted home (never restored here): what the record says is current.
            self._restored = True
            self._committed, self._legacy_seen = hold.record.committed, hold.record.legacy_seen
        if self._unmirrored is not None:
            key, committed_as = self._unmirrored
            await self._mirror(key)
            self._unmirrored = None
            expected = committed_as
        key = snapshot_key(self._workspace_id, self._epoch, new_write_id())
        fresh = Generation(stored=None, fingerprint=expected.fingerprint, size=expected.size)
        saved = await self._persistence.save(
            self._workspace_id,
            codex_home,
            fresh,
            read_as=read_as,
            recorded_home=recorded_home,
            key=key,
        )
        if saved is fresh:
            return expected
        try:
            await self._placement.commit(self._workspace_id, self._epoch, key, self._legacy_seen)
        except NoLongerOwner as exc:
            await self._delete([key])
            raise StaleSnapshot(
                f"not committing {key}: another pod owns workspace {self._workspace_id} now ({exc})"
            ) from exc
        except StoreUnavailable as exc:
            # In doubt: it may be committed; deleted only once a later commit succeeds.
            self._leftovers.add(key)
            raise PersistenceUnavailable(f"committing {key} failed: {exc}") from exc
        previous, self._committed = self._committed, key
        old = {previous} | self._leftovers if previous is not None else set(self._leftovers)
        self._leftovers.clear()
        try:
            await self._mirror(key)
        except PersistenceUnavailable:
            self._unmirrored = (key, saved)
            raise
        finally:
            await self._delete(sorted(old - {key}))
        return saved

    async def _mirror(self, key: str) -> None:
        """Copy the committed ``key`` to the legacy archive key, unless no longer the owner."""
        legacy = archive_key(self._workspace_id)
        try:
            # A pod that lost the workspace since its commit must not copy an older snapshot
            # over the new owner's mirror: look at the record first.
            current = await self._placement.records.read_owner(self._workspace_id)
            hold = self._placement.hold(self._workspace_id, self._epoch)
            if current is None or current.etag != hold.etag:
                log.warning("owner.mirror_skipped", key=legacy, snapshot=key)
                return
            etag = await self._store.copy(
                key, legacy, metadata={MIRROR_TAG: key, "cxg-epoch": str(self._epoch)}
            )
        except NoLongerOwner:
            log.warning("owner.mirror_skipped", key=legacy, snapshot=key)
            return
        except StoreUnavailable as exc:
            raise PersistenceUnavailable(f"mirroring {key} to {legacy} failed: {exc}") from exc
        self._legacy_seen = etag

    async def _delete(self, keys: list[str]) -> None:
        """Delete superseded snapshots; failures are logged (a lifecycle rule catches them)."""
        with trio.CancelScope(shield=True), trio.move_on_after(DELETE_SECONDS):
            for key in keys:
                try:
                    await self._store.delete(key)
                except StoreUnavailable as exc:
                    log.warning("owner.snapshot_delete_failed", key=key, error=str(exc))
