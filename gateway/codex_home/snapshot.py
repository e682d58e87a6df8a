"""A consistent snapshot of a live CODEX_HOME, and a cheap fingerprint of its state.

While ``codex app-server`` runs it keeps SQLite databases open in WAL mode and appends to
rollout JSONL files. A plain file copy of a database and its ``-wal`` taken at two different
moments can be corrupt, so:

* SQLite databases (recognised by their header, whatever their name) are copied through the
  SQLite backup API from a read-only connection, which yields one committed state including
  what is still only in the WAL; their ``-wal``, ``-shm`` and ``-journal`` companions are never
  archived (restoring a stale WAL next to a backup copy would corrupt it);
* rollouts and other files are copied as they are; ``*.jsonl`` files are cut after their last
  complete line;
* runtime files are never archived: sockets, fifos, devices, symlinks (codex's PATH aliases),
  lock/pid files, the model-token file, and codex's runtime directories;
* the rollout paths that codex's state databases record are rewritten, in the copy only, to
  the home the archive is meant for (``recorded_home``): the Go service's layout, so that a
  Go gateway restoring the archive (a rollback) can resume its threads.

The fingerprint hashes names, sizes, mtimes and inodes (including database WALs, whose
content the backup captures) — never file contents — so an unchanged home costs one directory
walk and uploads nothing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import attrs

from gateway.codex_home.archive import EntryKind, PackEntry
from gateway.codex_home.relocate import relocate_state_database

SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_COMPANION_SUFFIXES = ("-wal", "-shm", "-journal")
# Top-level directories codex 0.169.0 uses for runtime state: the control socket and startup
# lock, the daemon's pid files, the arg0 helper aliases (symlinks to the binary) and sync locks.
RUNTIME_TOP_DIRECTORIES = frozenset({"app-server-control", "app-server-daemon", "tmp", ".tmp"})
# Names that are runtime state wherever they appear.
RUNTIME_NAME_PATTERNS = ("*.lock", "*.pid", "*.sock", "model-token*", ".cxg-*")
# Bumped when what goes into an archive changes, so the next save uploads even if no file did.
SNAPSHOT_FORMAT = "cxg-snapshot-1"
_BUSY_TIMEOUT_SECONDS = 10.0


@attrs.frozen
class ExcludePolicy:
    """Which paths of a home are runtime state and never archived.

    ``extra_patterns`` are ``fnmatch`` patterns matched against the relative POSIX path and
    against the bare name, for files the session itself places in CODEX_HOME.
    """

    extra_patterns: tuple[str, ...] = ()

    def is_runtime(self, relative: PurePosixPath) -> bool:
        """Whether ``relative`` (a path inside the home) is excluded; pure, no I/O."""
        if relative.parts and relative.parts[0] in RUNTIME_TOP_DIRECTORIES:
            return True
        name = relative.name
        text = relative.as_posix()
        for pattern in (*RUNTIME_NAME_PATTERNS, *self.extra_patterns):
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(text, pattern):
                return True
        return False


@attrs.frozen
class HomeEntry:
    """A file or directory of a home that belongs in a snapshot."""

    relative: PurePosixPath
    path: Path
    kind: EntryKind
    info: os.stat_result


def iter_home(root: Path, policy: ExcludePolicy) -> Iterator[HomeEntry]:
    """Walk ``root`` depth first in sorted order, yielding directories before their contents.

    Only regular files and real directories are yielded; links, sockets, fifos and devices are
    skipped, as are runtime paths. Entries that vanish during the walk are skipped (the home is
    live). Memory holds one directory listing per level, not the whole tree.
    """
    stack: list[tuple[Path, PurePosixPath]] = [(root, PurePosixPath())]
    while stack:
        directory, relative_dir = stack.pop()
        try:
            with os.scandir(directory) as scan:
                names = sorted(entry.name for entry in scan)
        except (FileNotFoundError, NotADirectoryError):
            continue
        subdirectories: list[tuple[Path, PurePosixPath]] = []
        for name in names:
            relative = relative_dir / name
            if policy.is_runtime(relative):
                continue
            path = directory / name
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                yield HomeEntry(relative, path, EntryKind.DIRECTORY, info)
                subdirectories.append((path, relative))
            elif stat.S_ISREG(info.st_mode):
                yield HomeEntry(relative, path, EntryKind.FILE, info)
        # Reversed onto the stack so that directories are visited in sorted order; a
        # directory's own entries were all yielded before any of its subdirectories' contents,
        # which keeps every parent ahead of its children.
        stack.extend(reversed(subdirectories))


def is_sqlite_companion(entry: HomeEntry) -> bool:
    """Whether ``entry`` is the ``-wal``/``-shm``/``-journal`` file of a database beside it."""
    name = entry.relative.name
    for suffix in SQLITE_COMPANION_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return entry.path.with_name(name[: -len(suffix)]).is_file()
    return False


def fingerprint_home(root: Path, policy: ExcludePolicy) -> str:
    """A digest of the home's visible state: names, kinds, sizes, mtimes, inodes, modes.

    ``-shm`` files are left out because readers update them; ``-wal`` files are in, because a
    database's latest commits live there until a checkpoint.
    """
    digest = hashlib.sha256(SNAPSHOT_FORMAT.encode())
    for entry in iter_home(root, policy):
        if entry.relative.name.endswith("-shm"):
            continue
        info = entry.info
        line = (
            f"{entry.relative.as_posix()}\0{entry.kind.value}\0{info.st_size}\0"
            f"{info.st_mtime_ns}\0{info.st_ino}\0{info.st_mode:o}\n"
        )
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def is_sqlite_database(path: Path) -> bool:
    """Whether ``path`` starts with the SQLite header (names carry version suffixes)."""
    try:
        with open(path, "rb") as file:
            return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def backup_sqlite(source: Path, destination: Path) -> None:
    """Copy a live database through the SQLite backup API into ``destination``.

    The source is opened read-only, so closing this connection never checkpoints or deletes
    the live WAL under codex's feet. The copy is one committed state, WAL content included.
    """
    uri = f"file:{quote(str(source))}?mode=ro"
    src = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_SECONDS)
    try:
        dst = sqlite3.connect(destination)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def snapshot_entries(
    root: Path, policy: ExcludePolicy, scratch: Path, recorded_home: Path | None = None
) -> Iterator[PackEntry]:
    """The entries of a consistent snapshot of ``root``, ready for ``write_archive``.

    Database copies are made one at a time in ``scratch`` just before they are archived and
    removed right after, so extra disk use is bounded by the largest database. With
    ``recorded_home``, the copies of the top-level ``state_*.sqlite`` databases record their
    rollout paths under that directory instead of ``root``; the live databases are untouched.
    """
    for entry in iter_home(root, policy):
        name = entry.relative.as_posix()
        mode = stat.S_IMODE(entry.info.st_mode)
        mtime = int(entry.info.st_mtime)
        if entry.kind is EntryKind.DIRECTORY:
            yield PackEntry(name=name, kind=EntryKind.DIRECTORY, mode=mode, mtime=mtime)
            continue
        if is_sqlite_companion(entry):
            continue
        if is_sqlite_database(entry.path):
            copy = _backup_copy(entry.path, scratch)
            if copy is not None and recorded_home is not None and _is_state_database(name):
                relocate_state_database(copy, recorded_home)
            if copy is not None:
                try:
                    yield PackEntry(
                        name=name, kind=EntryKind.FILE, mode=mode, mtime=mtime, source=copy
                    )
                finally:
                    copy.unlink(missing_ok=True)
                continue
        yield PackEntry(
            name=name,
            kind=EntryKind.FILE,
            mode=mode,
            mtime=mtime,
            source=entry.path,
            trim_partial_line=name.endswith(".jsonl"),
        )


def _is_state_database(name: str) -> bool:
    return "/" not in name and fnmatch.fnmatchcase(name, "state_*.sqlite")


def _backup_copy(source: Path, scratch: Path) -> Path | None:
    """Back ``source`` up into a fresh file in ``scratch``; ``None``: archive the file raw.

    A busy database (a writer holding a rollback-journal lock past the timeout) fails the save,
    which is retried. A file that is not a usable database despite its header is archived as
    it is, so one broken file never stops the user's rollouts from being saved.
    """
    fd, name = tempfile.mkstemp(dir=scratch, prefix="db-", suffix=".sqlite")
    os.close(fd)
    copy = Path(name)
    try:
        backup_sqlite(source, copy)
    except sqlite3.Error as exc:
        copy.unlink(missing_ok=True)
        if _is_busy(exc):
            raise
        return None
    except BaseException:
        copy.unlink(missing_ok=True)
        raise
    return copy


@contextlib.contextmanager
def scratch_directory(near: Path) -> Iterator[Path]:
    """A private (0700) temporary directory beside ``near``, on the same filesystem."""
    with tempfile.TemporaryDirectory(dir=near, prefix=".cxg-snapshot-") as name:
        yield Path(name)
