"""Restore and save a workspace's CODEX_HOME through the object store.

This is the one facade sessions use: ``restore`` before the child starts, ``save`` at each
checkpoint and at stop. It owns the archive format, the safety checks and fencing.

Fencing. Every save is conditional on the ``Generation`` the session last restored or saved:
the write succeeds only if the stored object is still the one that generation names (S3:
``If-Match: <etag>``, or ``If-None-Match: *`` when there was no object; local store: the same
check under a lock, then an atomic rename). A stale writer — an older session of the workspace
on another pod, or a zombie — gets ``StaleSnapshot`` and the newer snapshot stays. Archives
larger than one part go up as multipart uploads; AWS S3 applies the condition when the upload
is completed, and the S3 store additionally checks the stored ETag before starting and right
before completing, so stores that ignore conditions on completion (moto, some S3-compatible
servers) still reject stale writers and writes that race a long upload; there only a
competing write in the last round trip before completion could be overwritten.

Errors (all ``PersistenceError``; each message names the object key):

* ``HostileArchive``: the stored archive is unsafe or malformed; nothing was restored and the
  object is untouched. The session refuses to start.
* ``PersistenceUnavailable`` (also a ``StoreUnavailable``): the store is unreachable, denied
  access or failed; the session answers 503 (restore) or keeps the local copy and retries
  (save).
* ``StaleSnapshot`` (also a ``PreconditionFailed``): a newer snapshot exists; this writer must
  stop saving over it.
* ``UnrestorableHome``: the home is past the restore limits (``CXG_RESTORE_MAX_*``), so the
  archive is not stored: a snapshot nobody could restore must never replace one that can be.
* ``PersistenceError`` itself: a local problem (disk full, target directory not empty).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterable, Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import attrs
import structlog
import trio

from gateway.codex_home import archive, snapshot
from gateway.codex_home.pipe import consume_in_thread, produce_in_thread
from gateway.config import Config, RestoreLimits
from gateway.store.base import (
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StoreUnavailable,
    archive_key,
)
from gateway.store.local import LocalDirectoryStore

log = structlog.get_logger(__name__)

# Refused archives remembered per daemon; beyond this many the least recently refused is
# forgotten (and read once more if asked for again).
REFUSAL_MEMO_SIZE = 1024

#: Given the snapshot's scratch directory, a scope in which the live home is read (the session
#: passes one that reads with the child's own file ids; gateway/sessions/isolation.py).
ReadAs = Callable[[Path], AbstractContextManager[object]]


class PersistenceError(Exception):
    """Restoring or saving a CODEX_HOME failed; the message names the object key."""


class HostileArchive(PersistenceError):
    """A stored archive breaks the safety rules; it is refused and left untouched."""


class PersistenceUnavailable(PersistenceError, StoreUnavailable):
    """The object store could not be reached or refused the request (maps to HTTP 503)."""


class UnrestorableHome(PersistenceError):
    """The home is past the restore limits: stored, it could never be restored, so it is not."""


class StaleSnapshot(PersistenceError, PreconditionFailed):
    """A newer snapshot was stored since the generation this writer holds; nothing written."""


@attrs.frozen
class Generation:
    """What a session knows about its stored archive.

    ``stored``: the store's generation (S3 ETag) of the archive, ``None`` when there is none.
    ``fingerprint``: the state of the local home when it was restored or last saved, used to
    skip uploads when nothing changed (``None``: unknown, the next save uploads).
    ``size``: the archive's compressed size in bytes when known.

    ``save`` returns its argument unchanged (the very same object) when it uploaded nothing,
    so ``new is not expected`` — or ``new.stored != expected.stored`` — means "uploaded".
    """

    stored: str | None
    fingerprint: str | None = None
    size: int | None = None


class RefusalMemo:
    """The refusals of recent restores, by object key and generation, in bounded memory.

    A refused archive stays refused until the object changes (a new generation), so asking
    again must not download and unpack a gzip bomb again. Least recently used entries go
    first once ``capacity`` keys are held.
    """

    def __init__(self, capacity: int = REFUSAL_MEMO_SIZE) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, generation: str) -> str | None:
        """The refusal of ``key`` at ``generation``, or ``None`` (never refused, or changed)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] != generation:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def remember(self, key: str, generation: str, message: str) -> None:
        """Record that ``key`` at ``generation`` was refused with ``message``."""
        self._entries[key] = (generation, message)
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)


class Persistence:
    """Restores and saves CODEX_HOME directories as ``codex-app-gateway/<ws>.tar.gz``.

    ``max_entry_bytes`` bounds one restored file (default: ``limits.max_total_bytes``);
    ``exclude`` adds ``fnmatch`` patterns of runtime files the session places in the home
    (on top of the built-in ones: sockets, locks, pid files, ``model-token*``, codex's runtime
    directories). ``compresslevel`` trades CPU for archive size.
    """

    def __init__(
        self,
        store: ObjectStore,
        limits: RestoreLimits,
        *,
        max_entry_bytes: int | None = None,
        exclude: tuple[str, ...] = (),
        compresslevel: int = archive.DEFAULT_COMPRESSLEVEL,
    ) -> None:
        self.store = store
        self.limits = limits
        self.archive_limits = archive.ArchiveLimits(
            max_total_bytes=limits.max_total_bytes,
            max_entries=limits.max_entries,
            max_entry_bytes=(
                limits.max_total_bytes if max_entry_bytes is None else max_entry_bytes
            ),
            max_ratio=limits.max_ratio,
        )
        self.policy = snapshot.ExcludePolicy(extra_patterns=exclude)
        self.compresslevel = compresslevel
        self.refusals = RefusalMemo()

    # --- restore ------------------------------------------------------------------------------

    async def restore(
        self, workspace_id: str, codex_home: Path, *, key: str | None = None
    ) -> Generation:
        """Fill the empty (or missing) directory ``codex_home`` from the stored archive.

        No object: ``codex_home`` is left empty (created 0700 if missing) and the generation's
        ``stored`` is ``None``. Otherwise the archive is streamed and extracted into a staging
        directory beside ``codex_home``, which replaces it only once everything was checked
        and written: a bad archive leaves nothing behind. Restored files are 0600, directories
        0700. Raises ``HostileArchive``, ``PersistenceUnavailable`` or ``PersistenceError``.
        ``key``: another object than the workspace's archive (a replica-mode snapshot).
        """
        key = key or archive_key(workspace_id)
        await trio.to_thread.run_sync(_prepare_target, codex_home, key)
        staging = Path(
            await trio.to_thread.run_sync(
                lambda: tempfile.mkdtemp(
                    dir=codex_home.parent, prefix=f".{codex_home.name}.restore-"
                )
            )
        )
        generation: str | None = None
        try:
            try:
                async with self.store.open_read(key) as stored:
                    generation, size = stored.generation, stored.size
                    refused = self.refusals.get(key, generation)
                    if refused is not None:
                        # The very object refused before: the same answer, without reading it.
                        raise HostileArchive(refused)
                    stats = await consume_in_thread(
                        stored.chunks(),
                        lambda pull: archive.unpack_archive(
                            pull, staging, self.archive_limits, compressed_size=size
                        ),
                    )
            except ObjectNotFound:
                generation, size, stats = None, None, None
            except StoreUnavailable as exc:
                raise PersistenceUnavailable(
                    f"restoring {key} from {self.store.describe()} failed: {exc}"
                ) from exc
            except archive.BadArchive as exc:
                message = (
                    f"refusing to restore {key} from {self.store.describe()}: {exc}; "
                    "the stored archive was left untouched"
                )
                if generation is not None:
                    self.refusals.remember(key, generation, message)
                raise HostileArchive(message) from exc
            except OSError as exc:
                raise PersistenceError(f"restoring {key} into {codex_home} failed: {exc}") from exc
            if generation is not None:
                try:
                    await trio.to_thread.run_sync(_move_into_place, staging, codex_home)
                except OSError as exc:
                    raise PersistenceError(
                        f"restoring {key}: cannot move the restored home into {codex_home}: {exc}"
                    ) from exc
        finally:
            # Shielded: a cancelled restore must still not leave a half-restored tree behind.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))
        if stats is not None and stats.skipped:
            # One line per restore, however many entries: codex leaves such links behind.
            log.info(
                "restore.entries_skipped",
                key=key,
                symlinks=stats.skipped_symlinks,
                fifos_and_devices=stats.skipped_special,
                dangling_hardlinks=stats.skipped_hardlinks,
            )
        fingerprint = await trio.to_thread.run_sync(
            snapshot.fingerprint_home, codex_home, self.policy
        )
        return Generation(stored=generation, fingerprint=fingerprint, size=size)

    # --- save ---------------------------------------------------------------------------------

    async def save(
        self,
        workspace_id: str,
        codex_home: Path,
        expected: Generation,
        *,
        read_as: ReadAs | None = None,
        recorded_home: Path | None = None,
        key: str | None = None,
    ) -> Generation:
        """Snapshot ``codex_home`` and write it, conditional on ``expected``; may run live.

        ``read_as`` scopes the reading of the home's files (in the packing thread only).

        Returns ``expected`` itself when the home is unchanged since that generation (nothing
        is uploaded), else the new generation. The local directory is never modified or
        deleted here. ``recorded_home``: where the archived state databases say the home is
        (the Go service's ``<CXG_TMP_ROOT>/<workspace>``, so a rollback resumes threads);
        ``None`` keeps ``codex_home``. Raises ``StaleSnapshot``, ``PersistenceUnavailable``
        or ``PersistenceError``; on any failure the stored object is the previous one.
        ``key``: write another object than the workspace's archive (a replica-mode snapshot).
        """
        key = key or archive_key(workspace_id)
        try:
            fingerprint = await trio.to_thread.run_sync(
                snapshot.fingerprint_home, codex_home, self.policy
            )
        except OSError as exc:
            raise PersistenceError(f"scanning {codex_home} for {key} failed: {exc}") from exc
        if expected.fingerprint is not None and fingerprint == expected.fingerprint:
            return expected

        def pack(emit: Callable[[bytes], None]) -> int:
            with (
                snapshot.scratch_directory(codex_home.parent) as scratch,
                read_as(scratch) if read_as is not None else nullcontext(),
            ):
                entries = snapshot.snapshot_entries(codex_home, self.policy, scratch, recorded_home)
                return archive.write_archive(
                    entries,
                    emit,
                    level=self.compresslevel,
                    restorable_within=self.archive_limits,
                )

        async def upload(chunks: AsyncIterable[bytes]) -> str:
            return await self.store.write(key, chunks, expected_generation=expected.stored)

        try:
            size, stored = await produce_in_thread(pack, upload)
        except PreconditionFailed as exc:
            raise StaleSnapshot(
                f"not saving {key}: a newer snapshot was stored since generation "
                f"{expected.stored or '(none)'} ({exc})"
            ) from exc
        except StoreUnavailable as exc:
            raise PersistenceUnavailable(
                f"saving {key} to {self.store.describe()} failed: {exc}"
            ) from exc
        except archive.BadArchive as exc:
            raise UnrestorableHome(
                f"not saving {key}: the home could not be restored under the restore limits "
                f"({exc}); the stored snapshot is kept, and so is the local home"
            ) from exc
        except (OSError, sqlite3.Error) as exc:
            raise PersistenceError(f"snapshotting {codex_home} for {key} failed: {exc}") from exc
        assert isinstance(stored, str)
        return Generation(stored=stored, fingerprint=fingerprint, size=size)


def _prepare_target(codex_home: Path, key: str) -> None:
    """Make sure ``codex_home`` exists as an empty 0700 directory."""
    codex_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(codex_home.iterdir()):
        raise PersistenceError(f"cannot restore {key}: {codex_home} is not empty")
    os.chmod(codex_home, 0o700)


def _move_into_place(staging: Path, codex_home: Path) -> None:
    """Replace the empty ``codex_home`` with the fully restored ``staging`` in one rename."""
    os.chmod(staging, 0o700)
    # rename(2) atomically replaces an empty directory with a directory.
    os.rename(staging, codex_home)


def open_object_store(config: Config) -> ObjectStore:
    """The configured store: S3 when ``config.s3`` is set, else the local directory store."""
    if config.s3 is not None:
        from gateway.store.s3 import S3ObjectStore

        return S3ObjectStore(config.s3)
    return LocalDirectoryStore(config.local_store_dir)
