"""The CODEX_HOME archive format: a gzip-compressed tar, streamed both ways.

Format (compatible with the Go service both ways): entry names are POSIX paths relative to the
home, without a ``./`` prefix; the root itself is not an entry; directories are entries (before
their contents); only regular files and directories are written. Restore accepts those plus
``./``-prefixed names and a ``.`` root entry as other tar writers produce them.

Everything here is synchronous and meant to run in a worker thread: packing pushes compressed
chunks to an ``emit`` callback, unpacking pulls compressed chunks from a ``pull`` callback, so
the async side can stream to and from the object store through a small channel and memory
stays bounded whatever the size of the home.

The safety rules for restore are the pure function ``check_member`` and the ``ExtractBudget``
accumulator; they do no I/O and are tested on arbitrary names.
"""

from __future__ import annotations

import enum
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import attrs

KIB = 1024
MIB = 1024 * KIB
CHUNK_SIZE = 256 * KIB
COPY_SIZE = 1 * MIB
DEFAULT_COMPRESSLEVEL = 6
# The longest legitimate metadata record (PAX header, GNU long name) is a few KiB; anything
# larger is an attempt to make tarfile buffer it in memory.
MAX_METADATA_BYTES = 1 * MIB
# Tar framing around the data: up to three header blocks per entry (PAX, name, file), block
# padding, the end-of-archive blocks and the record padding. Used to bound decompressed bytes.
_PER_ENTRY_OVERHEAD = 4 * tarfile.BLOCKSIZE
_STREAM_SLACK = 1 * MIB

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


class BadArchive(Exception):
    """The archive is unsafe or malformed; the message says why (never echoes file data)."""


class UnsafeEntry(BadArchive):
    """One entry breaks the safety rules (traversal, link, device, size, count)."""


class EntryKind(enum.Enum):
    """What an accepted entry creates."""

    FILE = "file"
    DIRECTORY = "directory"


@attrs.frozen
class ArchiveLimits:
    """Bounds enforced while restoring (see ``gateway.config.RestoreLimits``)."""

    max_total_bytes: int
    max_entries: int
    max_entry_bytes: int

    def max_stream_bytes(self) -> int:
        """The most decompressed bytes a conforming archive within these limits can have."""
        return self.max_total_bytes + self.max_entries * _PER_ENTRY_OVERHEAD + _STREAM_SLACK


_FILE_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_LINK_TYPES = frozenset({tarfile.SYMTYPE, tarfile.LNKTYPE})
_DEVICE_TYPES = frozenset({tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE})
_METADATA_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)


def check_member(name: str, type_flag: bytes, size: int) -> tuple[PurePosixPath, EntryKind] | None:
    """Decide whether an entry may be restored; pure, no I/O.

    Returns the entry's relative path and kind, or ``None`` for an entry that names the root
    itself (``.`` or ``./``), which is skipped. Raises ``UnsafeEntry`` for anything that could
    escape the target directory or create something other than a regular file or directory.
    """
    shown = repr(name[:200])
    if type_flag in _LINK_TYPES:
        kind = "symlink" if type_flag == tarfile.SYMTYPE else "hardlink"
        raise UnsafeEntry(f"entry {shown} is a {kind}; links are not restored")
    if type_flag in _DEVICE_TYPES:
        raise UnsafeEntry(f"entry {shown} is a device or fifo")
    if type_flag == tarfile.DIRTYPE:
        kind_of = EntryKind.DIRECTORY
    elif type_flag in _FILE_TYPES:
        kind_of = EntryKind.FILE
    else:
        raise UnsafeEntry(f"entry {shown} has unsupported type {type_flag!r}")
    if "\x00" in name:
        raise UnsafeEntry(f"entry {shown} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeEntry(f"entry {shown} is an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeEntry(f"entry {shown} contains a '..' component")
    if size < 0:
        raise UnsafeEntry(f"entry {shown} has a negative size")
    if kind_of is EntryKind.DIRECTORY and size:
        raise UnsafeEntry(f"directory entry {shown} carries data")
    if not parts:
        if kind_of is EntryKind.DIRECTORY:
            return None
        raise UnsafeEntry(f"entry {shown} names the archive root as a file")
    return PurePosixPath(*parts), kind_of


@attrs.define
class ExtractBudget:
    """Counts entries and bytes while restoring; raises when a limit would be crossed."""

    limits: ArchiveLimits
    entries: int = 0
    total_bytes: int = 0

    def admit(
        self, name: str, type_flag: bytes, size: int
    ) -> tuple[PurePosixPath, EntryKind] | None:
        """Check one entry (``check_member``) and charge it against the limits."""
        checked = check_member(name, type_flag, size)
        if checked is None:
            return None
        shown = repr(name[:200])
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise UnsafeEntry(f"more than {self.limits.max_entries} entries")
        if size > self.limits.max_entry_bytes:
            raise UnsafeEntry(
                f"entry {shown} is {size} bytes, over the {self.limits.max_entry_bytes}-byte "
                "bound per entry"
            )
        self.total_bytes += size
        if self.total_bytes > self.limits.max_total_bytes:
            raise UnsafeEntry(
                f"expanded size exceeds {self.limits.max_total_bytes} bytes at entry {shown}"
            )
        return checked


# --- packing ----------------------------------------------------------------------------------


@attrs.frozen
class PackEntry:
    """One entry to write. ``source`` is read for files; ``mode`` keeps the permission bits.

    ``trim_partial_line`` stores a file only up to its last newline: an append-only JSONL file
    caught mid-write then holds whole records only, and the rest arrives with the next save.
    """

    name: str
    kind: EntryKind
    mode: int
    mtime: int
    source: Path | None = None
    trim_partial_line: bool = False


class GzipChunkWriter:
    """A write-only file for tarfile: compresses and hands out chunks of about ``chunk_size``."""

    def __init__(
        self,
        emit: Callable[[bytes], None],
        *,
        chunk_size: int = CHUNK_SIZE,
        level: int = DEFAULT_COMPRESSLEVEL,
    ) -> None:
        self._emit = emit
        self._chunk_size = chunk_size
        # wbits=31: a gzip wrapper (header + CRC32 trailer), as Go's compress/gzip expects.
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._buffer = bytearray()
        self.bytes_in = 0
        self.bytes_out = 0

    def write(self, data: bytes) -> int:
        """Compress ``data``; emit whenever a full chunk is ready."""
        self.bytes_in += len(data)
        self._buffer += self._compressor.compress(data)
        if len(self._buffer) >= self._chunk_size:
            self._flush_buffer()
        return len(data)

    def _flush_buffer(self) -> None:
        if self._buffer:
            chunk = bytes(self._buffer)
            self._buffer.clear()
            self.bytes_out += len(chunk)
            self._emit(chunk)

    def close(self) -> None:
        """Finish the gzip stream and emit what is left."""
        self._buffer += self._compressor.flush()
        self._flush_buffer()


def _last_newline_size(file: BinaryIO, size: int) -> int:
    """The length of the longest prefix of ``file[:size]`` ending in a newline (or ``size``)."""
    block = 64 * KIB
    end = size
    scanned = 0
    # Only the tail is scanned: a partial record is one line; a file with no newline in its
    # last MiB is not line-oriented and is stored whole.
    while end > 0 and scanned < MIB:
        start = max(0, end - block)
        file.seek(start)
        data = file.read(end - start)
        index = data.rfind(b"\n")
        if index >= 0:
            file.seek(0)
            return start + index + 1
        scanned += end - start
        end = start
    file.seek(0)
    return size


class _ExactReader:
    """A file view that yields exactly ``size`` bytes (zero-padded if the file shrank)."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self._remaining = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._remaining:
            n = self._remaining
        if n == 0:
            return b""
        # tarfile insists on full reads; a file that shrank since its header was written
        # (rewritten during the snapshot) is padded with zeros. Its metadata changed too, so
        # the next save stores it again.
        data = bytearray()
        while len(data) < n:
            piece = self._file.read(n - len(data))
            if not piece:
                data += bytes(n - len(data))
                break
            data += piece
        self._remaining -= n
        return bytes(data)


def _tarinfo(entry: PackEntry, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.type = tarfile.DIRTYPE if entry.kind is EntryKind.DIRECTORY else tarfile.REGTYPE
    info.mode = entry.mode & 0o777
    # An integer mtime keeps tarfile from adding a PAX record to every entry.
    info.mtime = int(entry.mtime)
    info.size = size
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_archive(
    entries: Iterable[PackEntry],
    emit: Callable[[bytes], None],
    *,
    chunk_size: int = CHUNK_SIZE,
    level: int = DEFAULT_COMPRESSLEVEL,
) -> int:
    """Write ``entries`` as a tar.gz stream to ``emit``; return the compressed size.

    Files that vanish between listing and reading are left out (they were deleted while the
    home was live, which is what a later snapshot would show anyway).
    """
    sink = GzipChunkWriter(emit, chunk_size=chunk_size, level=level)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for entry in entries:
            if entry.kind is EntryKind.DIRECTORY:
                archive.addfile(_tarinfo(entry, 0))
                continue
            assert entry.source is not None, "file entries need a source"
            try:
                file = open(entry.source, "rb")  # noqa: SIM115 - closed below, around addfile
            except FileNotFoundError:
                continue
            with file:
                size = os.fstat(file.fileno()).st_size
                if entry.trim_partial_line and size:
                    size = _last_newline_size(file, size)
                archive.addfile(_tarinfo(entry, size), _ExactReader(file, size))
    sink.close()
    return sink.bytes_out


# --- unpacking --------------------------------------------------------------------------------


class GunzipReader:
    """A read-only file for tarfile over compressed chunks from ``pull`` (``b""`` = end).

    Decompression is bounded twice: each call returns at most what was asked for (zlib's
    ``max_length``), and the total output is capped, so a gzip bomb stops at the cap instead of
    filling memory or disk. Concatenated gzip members are read as one stream, like Go's reader.
    """

    def __init__(self, pull: Callable[[], bytes], *, max_output: int) -> None:
        self._pull = pull
        self._max_output = max_output
        self._decompressor = zlib.decompressobj(31)
        self._input = b""
        self._output = bytearray()
        self._finished = False
        self.bytes_in = 0
        self.bytes_out = 0

    def _next_input(self) -> bytes:
        chunk = self._pull()
        self.bytes_in += len(chunk)
        return chunk

    def _fill(self, wanted: int) -> None:
        while len(self._output) < wanted and not self._finished:
            if self._decompressor.eof:
                rest = self._decompressor.unused_data or self._next_input()
                if not rest:
                    self._finished = True
                    return
                self._decompressor = zlib.decompressobj(31)
                self._input = rest
            if not self._input:
                self._input = self._next_input()
                if not self._input:
                    raise BadArchive("the gzip stream is truncated")
            try:
                data = self._decompressor.decompress(self._input, wanted - len(self._output))
            except zlib.error as exc:
                raise BadArchive(f"not a valid gzip stream ({exc})") from None
            self._input = self._decompressor.unconsumed_tail
            self.bytes_out += len(data)
            if self.bytes_out > self._max_output:
                raise UnsafeEntry(
                    f"decompressed data exceeds {self._max_output} bytes (gzip bomb?)"
                )
            self._output += data

    def read(self, size: int = -1) -> bytes:
        """Return up to ``size`` decompressed bytes (``b""`` at the end)."""
        if size is None or size < 0:
            size = COPY_SIZE
        self._fill(size)
        data = bytes(self._output[:size])
        del self._output[:size]
        return data


class _GuardedTarInfo(tarfile.TarInfo):
    """Refuses oversized metadata records before tarfile reads them into memory."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:  # type: ignore[override]
        info = super().frombuf(buf, encoding, errors)
        if info.type in _METADATA_TYPES and info.size > MAX_METADATA_BYTES:
            raise UnsafeEntry(f"a metadata record of {info.size} bytes is over the bound")
        return info


@attrs.frozen
class UnpackStats:
    """What a restore wrote."""

    entries: int
    total_bytes: int
    compressed_bytes: int


def _ensure_directory(root: Path, relative: PurePosixPath) -> Path:
    """Create ``root/relative`` and missing parents as 0700 directories (never following links).

    Only this module writes under ``root`` (a fresh staging directory) and it never creates a
    link, so an existing component is either a directory we made or a file — a conflict.
    """
    current = root
    for part in relative.parts:
        current = current / part
        try:
            os.mkdir(current, DIRECTORY_MODE)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                raise UnsafeEntry(f"entry {str(relative)!r} conflicts with a file") from None
    return current


def _write_file(root: Path, relative: PurePosixPath, source: BinaryIO | None, size: int) -> None:
    parent = _ensure_directory(root, relative.parent)
    target = parent / relative.name
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, FILE_MODE)
    except (IsADirectoryError, OSError) as exc:
        if os.path.isdir(target):
            raise UnsafeEntry(f"entry {str(relative)!r} conflicts with a directory") from None
        raise exc
    with os.fdopen(fd, "wb") as out:
        # A later duplicate entry of the same name replaces the earlier one, as with tar; the
        # mode is reset because O_CREAT's mode only applies to new files.
        os.fchmod(out.fileno(), FILE_MODE)
        remaining = size
        while remaining and source is not None:
            data = source.read(min(COPY_SIZE, remaining))
            if not data:
                raise BadArchive(f"entry {str(relative)!r} is truncated")
            out.write(data)
            remaining -= len(data)


def unpack_archive(
    pull: Callable[[], bytes], destination: Path, limits: ArchiveLimits
) -> UnpackStats:
    """Extract a tar.gz stream from ``pull`` into the existing, empty ``destination``.

    Every entry is checked before anything is written for it; the first unsafe entry aborts
    the whole restore with ``UnsafeEntry`` (the caller discards ``destination``). Malformed
    data raises ``BadArchive``; local I/O problems raise ``OSError``.
    """
    reader = GunzipReader(pull, max_output=limits.max_stream_bytes())
    budget = ExtractBudget(limits)
    try:
        archive = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115 - closed below
            fileobj=reader, mode="r|", tarinfo=_GuardedTarInfo
        )
    except tarfile.ReadError as exc:
        raise BadArchive(f"not a tar archive ({exc})") from None
    try:
        with archive:
            for member in archive:
                if member.sparse is not None:
                    raise UnsafeEntry(f"entry {member.name[:200]!r} is a sparse file")
                checked = budget.admit(member.name, member.type, member.size)
                if checked is None:
                    continue
                relative, kind = checked
                if kind is EntryKind.DIRECTORY:
                    _ensure_directory(destination, relative)
                else:
                    _write_file(destination, relative, archive.extractfile(member), member.size)
    except tarfile.TarError as exc:
        raise BadArchive(f"malformed tar data ({exc})") from None
    except EOFError:
        raise BadArchive("the tar stream is truncated") from None
    return UnpackStats(
        entries=budget.entries, total_bytes=budget.total_bytes, compressed_bytes=reader.bytes_in
    )
