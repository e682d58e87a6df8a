"""A local directory object store: the embedded default when no S3 bucket is configured.

Objects are files under one root directory, keyed by relative path. A write streams into a
temporary ``.part`` file beside the target, then — holding an exclusive ``flock`` on the
object's directory — checks the current generation and renames the temporary file into place.
The rename is atomic, so readers see the old object or the new one, never a mix; the lock makes
"check, then replace" one step for every writer on this machine, in this process or another.
Locking the directory rather than a lock file per key leaves nothing but objects in the store,
and a failed or cancelled write removes its ``.part`` file (shielded), so the directory holds
only objects after any write.

A generation is the file's identity and metadata (inode, mtime in nanoseconds, size): every
successful write creates a new inode, so an old generation never matches a newer object.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import attrs
import trio

from gateway.store.base import ObjectNotFound, PreconditionFailed, StoreError, StoreUnavailable

READ_CHUNK_SIZE = 256 * 1024


def _generation_of(info: os.stat_result) -> str:
    return f"{info.st_ino:x}-{info.st_mtime_ns:x}-{info.st_size:x}"


def _current_generation(path: Path) -> str | None:
    try:
        return _generation_of(path.stat())
    except FileNotFoundError:
        return None


@attrs.define
class _LocalObject:
    """An open object file; the generation describes exactly the inode being read."""

    generation: str
    size: int | None
    _file: BinaryIO

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield the file in chunks of ``READ_CHUNK_SIZE`` bytes, reading off the event loop.

        A file that ends before the size it had when opened was cut short in place by someone
        else: that is a store failure, not a shorter archive.
        """
        received = 0
        while True:
            try:
                chunk = await trio.to_thread.run_sync(self._file.read, READ_CHUNK_SIZE)
            except OSError as exc:
                raise StoreUnavailable(f"reading {self._file.name} failed: {exc}") from exc
            if not chunk:
                if self.size is not None and received != self.size:
                    raise StoreUnavailable(
                        f"{self._file.name} ended after {received} of {self.size} bytes"
                    )
                return
            received += len(chunk)
            yield chunk


class LocalDirectoryStore:
    """Objects as files under one directory; generations from file metadata."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        """``local:<root>``."""
        return f"local:{self.root}"

    async def check(self) -> None:
        """The directory exists (or can be created) and is writable."""
        try:
            await trio.to_thread.run_sync(_ensure_writable_directory, self.root)
        except OSError as exc:
            raise StoreUnavailable(
                f"local store directory {self.root} is not usable (CXG_LOCAL_STORE_DIR): "
                f"{exc.strerror or exc}"
            ) from exc

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or any(p in ("..", ".") for p in parts):
            raise StoreError(f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    @asynccontextmanager
    async def open_read(self, key: str) -> AsyncIterator[_LocalObject]:
        """Open ``key``; the file stays readable even if a writer replaces it meanwhile."""
        path = self._path(key)
        try:
            file = await trio.to_thread.run_sync(open, path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.describe()}/{key}") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot open {path}: {exc}") from exc
        try:
            info = os.fstat(file.fileno())
            yield _LocalObject(generation=_generation_of(info), size=info.st_size, file=file)
        finally:
            file.close()

    async def write(
        self, key: str, chunks: AsyncIterable[bytes], *, expected_generation: str | None
    ) -> str:
        """Stream ``chunks`` to a temporary file, then replace ``key`` if it still matches."""
        path = self._path(key)
        try:
            await trio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
        except OSError as exc:
            raise StoreUnavailable(f"cannot create {path.parent}: {exc}") from exc
        # Same check as the S3 store makes before a long upload: a stale writer stops early.
        self._check(path, key, expected_generation)
        try:
            fd, tmp_name = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=".part"
            )
        except OSError as exc:
            raise StoreUnavailable(f"writing {path} failed: {exc}") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    await trio.to_thread.run_sync(out.write, chunk)
                await trio.to_thread.run_sync(_flush_and_sync, out)
            return await trio.to_thread.run_sync(self._commit, tmp, path, key, expected_generation)
        except OSError as exc:
            raise StoreUnavailable(f"writing {path} failed: {exc}") from exc
        finally:
            # Shielded: a cancelled write must not leave its partial file behind.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))

    def _check(self, path: Path, key: str, expected_generation: str | None) -> None:
        current = _current_generation(path)
        if current != expected_generation:
            raise PreconditionFailed(
                f"{self.describe()}/{key}: stored generation {current or '(none)'} is not the "
                f"expected {expected_generation or '(none)'}"
            )

    def _commit(self, tmp: Path, path: Path, key: str, expected_generation: str | None) -> str:
        """Check and rename under the directory's lock (runs in a worker thread)."""
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(directory, fcntl.LOCK_EX)
            self._check(path, key, expected_generation)
            os.replace(tmp, path)
            os.fsync(directory)  # the rename is durable, not just the file data
            return _generation_of(path.stat())
        finally:
            os.close(directory)  # releases the lock

    async def aclose(self) -> None:
        """Nothing to release."""
        return None


def _flush_and_sync(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())


def _ensure_writable_directory(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(13, "not writable")
