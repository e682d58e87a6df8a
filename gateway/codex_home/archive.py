"""The CODEX_HOME archive format: a gzip-compressed tar, streamed both ways.

Format (compatible with the Go service both ways): entry names are POSIX paths relative to the
home, without a ``./`` prefix; the root itself is not an entry; directories are entries (before
their contents); only regular files and directories are written. Restore accepts those plus
``./``-prefixed names and a ``.`` root entry as other tar writers produce them, hard links to
files of the same archive, and skips (counts, never creates) the symlinks, fifos and devices
the Go service archived as it found them.

A restore is all or nothing: the stream is read to its very end — the tar end-of-archive
marker, nothing but zero padding after it, every gzip trailer checked — so an archive that can
only be read in part is refused rather than restored as a smaller home that the next save
would write over the whole one.

Everything here is synchronous and meant to run in a worker thread: packing pushes compressed
chunks to an ``emit`` callback, unpacking pulls compressed chunks from a ``pull`` callback, so
the async side can stream to and from the object store through a small channel and memory
stays bounded whatever the size of the home.

The safety rules for restore are the pure function ``check_member`` and the ``ExtractBudget``
accumulator (entry count, bytes, and the compression-ratio bound on declared sizes); they do
no I/O and are tested on arbitrary names. Memory stays bounded too: tarfile's list of members
is cleared as the stream goes, and only directory times wait for the end (one per entry at
most, and entries are bounded).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

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
    """One entry breaks the safety rules (traversal, size, count, unsupported type)."""


class EntryKind(enum.Enum):
    """What an accepted entry becomes."""

    FILE = "file"
    DIRECTORY = "directory"
    # A hard link to a regular file restored earlier from the same archive.
    HARDLINK = "hardlink"
    # Restored as nothing: symlinks, fifos and device nodes are counted and skipped.
    SYMLINK = "symlink"
    SPECIAL = "fifo or device"


# Below this many expanded bytes an archive is never refused for its compression ratio: small
# homes with a few zero-filled files compress far better than large ones.
RATIO_FLOOR_BYTES = 256 * MIB


@attrs.frozen
class ArchiveLimits:
    """Bounds enforced while restoring (see ``gateway.config.RestoreLimits``).

    ``max_ratio`` bounds the expansion against the stored (compressed) size when that size is
    known: an archive may unpack to at most ``max_ratio`` times its stored size (but always to
    ``ratio_floor`` bytes, and never past ``max_total_bytes``). ``0`` turns the ratio bound off.
    """

    max_total_bytes: int
    max_entries: int
    max_entry_bytes: int
    max_ratio: int = 0
    ratio_floor: int = RATIO_FLOOR_BYTES

    def max_expanded_bytes(self, compressed_size: int | None) -> int:
        """The most file bytes an archive of ``compressed_size`` stored bytes may unpack to."""
        if not self.max_ratio or compressed_size is None:
            return self.max_total_bytes
        by_ratio = max(self.ratio_floor, self.max_ratio * compressed_size)
        return min(self.max_total_bytes, by_ratio)

    def max_stream_bytes(self, compressed_size: int | None = None) -> int:
        """The most decompressed bytes a conforming archive within these limits can have."""
        return (
            self.max_expanded_bytes(compressed_size)
            + self.max_entries * _PER_ENTRY_OVERHEAD
            + _STREAM_SLACK
        )


_FILE_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_SPECIAL_TYPES = frozenset({tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE})
_METADATA_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)


def _relative_path(name: str, what: str) -> PurePosixPath | None:
    """``name`` as a path inside the root (``None`` for the root itself); refuses escapes."""
    shown = repr(name[:200])
    if "\x00" in name:
        raise UnsafeEntry(f"{what} {shown} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeEntry(f"{what} {shown} is an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeEntry(f"{what} {shown} contains a '..' component")
    return PurePosixPath(*parts) if parts else None


def check_member(
    name: str, type_flag: bytes, size: int, linkname: str = ""
) -> tuple[PurePosixPath, EntryKind] | None:
    """Decide what an entry becomes; pure, no I/O.

    Returns the entry's relative path and kind, or ``None`` for an entry that names the root
    itself (``.`` or ``./``), which is skipped. Every entry's name must stay inside the root,
    whatever its type. Symlinks, fifos and devices come back as kinds the caller skips (they
    are never created, so their targets do not matter); a hard link's target must name a path
    inside the root as well. Raises ``UnsafeEntry`` for anything that could escape the target
    directory and for types that cannot be restored faithfully.
    """
    shown = repr(name[:200])
    if type_flag == tarfile.DIRTYPE:
        kind = EntryKind.DIRECTORY
    elif type_flag in _FILE_TYPES:
        kind = EntryKind.FILE
    elif type_flag == tarfile.LNKTYPE:
        kind = EntryKind.HARDLINK
    elif type_flag == tarfile.SYMTYPE:
        kind = EntryKind.SYMLINK
    elif type_flag in _SPECIAL_TYPES:
        kind = EntryKind.SPECIAL
    else:
        raise UnsafeEntry(f"entry {shown} has unsupported type {type_flag!r}")
    relative = _relative_path(name, "entry")
    if size < 0:
        raise UnsafeEntry(f"entry {shown} has a negative size")
    if kind is not EntryKind.FILE and size:
        raise UnsafeEntry(f"{kind.value} entry {shown} carries data")
    if relative is None:
        if kind is EntryKind.DIRECTORY:
            return None
        raise UnsafeEntry(f"entry {shown} names the archive root as a {kind.value}")
    if kind is EntryKind.HARDLINK and _relative_path(linkname, "hard link target") is None:
        raise UnsafeEntry(f"hard link {shown} points at the archive root")
    return relative, kind


@attrs.define
class ExtractBudget:
    """Counts entries and bytes while restoring; raises when a limit would be crossed.

    ``max_bytes`` is the expansion bound of this very archive (``max_total_bytes``, or less
    under the ratio bound); ``compressed_size`` is only for the message.
    """

    limits: ArchiveLimits
    compressed_size: int | None = None
    max_bytes: int = attrs.field()
    entries: int = 0
    total_bytes: int = 0

    @max_bytes.default
    def _max_bytes_default(self) -> int:
        return self.limits.max_expanded_bytes(self.compressed_size)

    def admit(
        self, name: str, type_flag: bytes, size: int, linkname: str = ""
    ) -> tuple[PurePosixPath, EntryKind] | None:
        """Check one entry (``check_member``) and charge it against the limits."""
        checked = check_member(name, type_flag, size, linkname)
        if checked is None:
            return None
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise UnsafeEntry(f"more than {self.limits.max_entries} entries")
        self.charge(name, size)
        return checked

    def count_directory(self) -> None:
        """Count a directory made for entries below it (one the archive has no entry for)."""
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise UnsafeEntry(f"more than {self.limits.max_entries} entries (directories included)")

    def charge(self, name: str, size: int) -> None:
        """Count ``size`` more bytes of the file ``name`` (a hard link costs its target's)."""
        shown = repr(name[:200])
        if size > self.limits.max_entry_bytes:
            raise UnsafeEntry(
                f"entry {shown} is {size} bytes, over the {self.limits.max_entry_bytes}-byte "
                "bound per entry"
            )
        self.total_bytes += size
        if self.total_bytes <= self.max_bytes:
            return
        if self.max_bytes < self.limits.max_total_bytes:
            raise UnsafeEntry(
                f"expanded size exceeds {self.max_bytes} bytes at entry {shown}: more than "
                f"{self.limits.max_ratio} times the {self.compressed_size}-byte stored archive "
                "(a gzip bomb? the bound is CXG_RESTORE_MAX_RATIO)"
            )
        raise UnsafeEntry(
            f"expanded size exceeds {self.limits.max_total_bytes} bytes at entry {shown}"
        )


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
    restorable_within: ArchiveLimits | None = None,
) -> int:
    """Write ``entries`` as a tar.gz stream to ``emit``; return the compressed size.

    Files that vanish between listing and reading are left out (they were deleted while the
    home was live, which is what a later snapshot would show anyway).

    ``restorable_within``: the limits a restore will apply. An archive that would break them
    (entries, bytes per entry, total, the ratio bound once the compressed size is known) raises
    ``UnsafeEntry`` before the stream ends, so it is never stored over a snapshot that can be
    restored.
    """
    budget = None if restorable_within is None else ExtractBudget(restorable_within)
    sink = GzipChunkWriter(emit, chunk_size=chunk_size, level=level)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for entry in entries:
            if entry.kind is EntryKind.DIRECTORY:
                if budget is not None:
                    budget.count_directory()
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
                if budget is not None:
                    budget.count_directory()  # an entry, whatever its kind
                    budget.charge(entry.name, size)
                archive.addfile(_tarinfo(entry, size), _ExactReader(file, size))
    sink.close()
    if budget is not None and restorable_within is not None:
        expandable = restorable_within.max_expanded_bytes(sink.bytes_out)
        if budget.total_bytes > expandable:
            raise UnsafeEntry(
                f"{budget.total_bytes} bytes of files compress to {sink.bytes_out} bytes, more "
                f"than the restore's ratio bound allows ({restorable_within.max_ratio} times, "
                "CXG_RESTORE_MAX_RATIO)"
            )
    return sink.bytes_out


# --- unpacking --------------------------------------------------------------------------------


class GunzipReader:
    """A read-only file for tarfile over compressed chunks from ``pull`` (``b""`` = end).

    Decompression is bounded twice: each call returns at most what was asked for (zlib's
    ``max_length``), and the total output is capped, so a gzip bomb stops at the cap instead of
    filling memory or disk. ``b""`` comes back only at the true end of the input, after the
    last member's trailer (CRC32 and length) was checked by zlib; input that ends early raises.

    Concatenated gzip members are read as one stream, as Go's ``compress/gzip`` reader (the
    Go service's restore), ``gzip -d`` and ``tar -xz`` do: an archive some tool split into
    members is still one tar, and every member's trailer is checked. Two whole tar archives
    gzipped one after the other are refused all the same, by the tar reader: after the first
    end-of-archive marker only zeros may follow.
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
                    raise BadArchive("the gzip stream is truncated (no trailer)")
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


class _StrictTarInfo(tarfile.TarInfo):
    """A header reader that never takes garbage for the end of the archive.

    ``tarfile`` ends its member list quietly at the first block it cannot parse once some
    entries were read, so garbage after the first entries would look like a complete, shorter
    archive. Here only a block of zeros (the end-of-archive marker) ends it; anything else that
    is not a valid header refuses the archive. Oversized metadata records are refused before
    tarfile reads them into memory.
    """

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            info = super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]  # not in typeshed
            raise
        except tarfile.EmptyHeaderError:  # type: ignore[attr-defined]
            raise BadArchive("the tar stream ends without its end-of-archive marker") from None
        except tarfile.HeaderError as exc:
            raise BadArchive(f"malformed tar header ({exc})") from None
        if info.type in _METADATA_TYPES and info.size > MAX_METADATA_BYTES:
            raise UnsafeEntry(f"a metadata record of {info.size} bytes is over the bound")
        return info


@attrs.frozen
class UnpackStats:
    """What a restore wrote, and what it skipped (never created)."""

    entries: int
    total_bytes: int
    compressed_bytes: int
    skipped_symlinks: int = 0
    skipped_special: int = 0
    skipped_hardlinks: int = 0

    @property
    def skipped(self) -> int:
        """Entries counted but not restored."""
        return self.skipped_symlinks + self.skipped_special + self.skipped_hardlinks


# The mode bits a restored file keeps: the owner's. Group and other bits, setuid, setgid and
# sticky never survive; the owner can always read and write (the gateway must read the file to
# save it, codex expects to write its own files).
_FILE_MODE_KEPT = 0o700
# Seconds since the epoch a restored mtime may have (out of range: the time of the restore).
_MAX_MTIME = 1 << 34


def _ensure_directory(
    root: Path, relative: PurePosixPath, on_create: Callable[[], None] | None = None
) -> Path:
    """Create ``root/relative`` and missing parents as 0700 directories (never following links).

    Only this module writes under ``root`` (a fresh staging directory) and it never creates a
    symlink, so an existing component is either a directory we made or a file — a conflict.
    ``on_create`` is called before each directory is made (to charge it to the budget).
    """
    current = root
    for part in relative.parts:
        current = current / part
        if on_create is not None and not os.path.lexists(current):
            on_create()
        try:
            os.mkdir(current, DIRECTORY_MODE)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                raise UnsafeEntry(f"entry {str(relative)!r} conflicts with a file") from None
    return current


def _replaceable(target: Path, relative: PurePosixPath) -> None:
    """Make way for a new file at ``target``: a later entry of the same name replaces the
    earlier one, as with tar. It is unlinked, not truncated, so a hard link made to the
    earlier file keeps the earlier content."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        raise UnsafeEntry(f"entry {str(relative)!r} conflicts with a directory")
    os.unlink(target)


def _valid_mtime(mtime: float) -> bool:
    return 0 <= mtime < _MAX_MTIME


def _write_file(
    root: Path,
    relative: PurePosixPath,
    source: IO[bytes] | None,
    size: int,
    *,
    mode: int,
    mtime: float,
) -> None:
    parent = _ensure_directory(root, relative.parent)
    target = parent / relative.name
    _replaceable(target, relative)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    permissions = (mode & _FILE_MODE_KEPT) | FILE_MODE
    fd = os.open(target, flags, FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        remaining = size
        while remaining and source is not None:
            data = source.read(min(COPY_SIZE, remaining))
            if not data:
                raise BadArchive(f"entry {str(relative)!r} is truncated")
            out.write(data)
            remaining -= len(data)
        out.flush()
        os.fchmod(out.fileno(), permissions)
        if _valid_mtime(mtime):
            os.utime(out.fileno(), (mtime, mtime))


def _link_target_size(root: Path, target: PurePosixPath) -> int | None:
    """The size of the regular file ``target`` restored earlier, or ``None`` if there is none.

    Resolving ``target`` cannot leave ``root``: its name has no ``..`` and no leading ``/``
    (``check_member``), and nothing under ``root`` is a symlink (none is ever created).
    """
    try:
        info = os.lstat(root / target)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _hard_link(root: Path, relative: PurePosixPath, target: PurePosixPath) -> None:
    parent = _ensure_directory(root, relative.parent)
    link = parent / relative.name
    if link == root / target:
        return
    _replaceable(link, relative)
    os.link(root / target, link, follow_symlinks=False)


def _expect_end_padding(stream: BinaryIO) -> None:
    """Read the tar stream past the first end-of-archive block: only zeros may follow.

    Tar writers end an archive with two zero blocks and may pad it further (GNU tar and Python
    to a 10240-byte record; Go's ``archive/tar`` writes exactly the two blocks). Anything else
    after the marker — a second archive, garbage — means the archive holds more than a
    restore would read, and is refused.
    """
    zeros = 0
    while data := stream.read(COPY_SIZE):
        if data.count(0) != len(data):
            raise BadArchive("data follows the tar end-of-archive marker")
        zeros += len(data)
    if zeros < tarfile.BLOCKSIZE:
        raise BadArchive("the tar end-of-archive marker is incomplete")


def _restore_entry(
    archive: tarfile.TarFile,
    member: tarfile.TarInfo,
    destination: Path,
    relative: PurePosixPath,
    kind: EntryKind,
    budget: ExtractBudget,
    skipped: dict[EntryKind, int],
) -> None:
    """Create what one admitted entry becomes under ``destination`` (or count it skipped)."""
    if kind in (EntryKind.SYMLINK, EntryKind.SPECIAL):
        skipped[kind] += 1
        return
    # Parents the archive has no entries for count as entries too: deep names must not turn
    # the entry bound into many times as many directories.
    _ensure_directory(destination, relative.parent, budget.count_directory)
    if kind is EntryKind.DIRECTORY:
        _ensure_directory(destination, relative)
    elif kind is EntryKind.FILE:
        _write_file(
            destination,
            relative,
            archive.extractfile(member),
            member.size,
            mode=member.mode,
            mtime=member.mtime,
        )
    elif kind is EntryKind.HARDLINK:
        target = _relative_path(member.linkname, "hard link target")
        assert target is not None  # check_member refuses links to the root
        size = _link_target_size(destination, target)
        if size is None:
            skipped[kind] += 1
            return
        # Charged at full size: the next save stores the link as a whole file.
        budget.charge(member.name, size)
        _hard_link(destination, relative, target)
    else:
        skipped[kind] += 1


def unpack_archive(
    pull: Callable[[], bytes],
    destination: Path,
    limits: ArchiveLimits,
    *,
    compressed_size: int | None = None,
) -> UnpackStats:
    """Extract a tar.gz stream from ``pull`` into the existing, empty ``destination``.

    Every entry is checked before anything is written for it; the first unsafe entry aborts
    the whole restore with ``UnsafeEntry`` (the caller discards ``destination``). The stream
    is read to its very end: the tar end-of-archive marker, only zeros after it, and every gzip
    trailer must be there, or ``BadArchive`` is raised, so an archive that cannot be read
    completely is never taken for a smaller one. ``compressed_size`` (the stored object's
    size, when known) arms the ratio bound of ``limits`` against gzip bombs, on declared sizes
    before anything is written. Files keep their mtime and their owner permission bits;
    symlinks, fifos and devices are skipped and counted. Local I/O problems raise ``OSError``.
    """
    reader = GunzipReader(pull, max_output=limits.max_stream_bytes(compressed_size))
    budget = ExtractBudget(limits, compressed_size=compressed_size)
    skipped = {kind: 0 for kind in (EntryKind.SYMLINK, EntryKind.SPECIAL, EntryKind.HARDLINK)}
    directory_times: dict[PurePosixPath, float] = {}
    try:
        archive = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115 - closed below
            fileobj=reader, mode="r|", tarinfo=_StrictTarInfo
        )
    except tarfile.ReadError as exc:
        raise BadArchive(f"not a tar archive ({exc})") from None
    try:
        with archive:
            while (member := archive.next()) is not None:
                # tarfile keeps every member it read; a stream needs none of them.
                archive.members.clear()
                if member.sparse is not None:
                    raise UnsafeEntry(f"entry {member.name[:200]!r} is a sparse file")
                checked = budget.admit(member.name, member.type, member.size, member.linkname)
                if checked is None:
                    continue
                relative, kind = checked
                try:
                    _restore_entry(archive, member, destination, relative, kind, budget, skipped)
                except OSError as exc:
                    if exc.errno != errno.ENAMETOOLONG:
                        raise
                    # The archive's fault, not the disk's: refused like any unrestorable entry.
                    raise UnsafeEntry(
                        f"entry {member.name[:200]!r} has a name too long to create"
                    ) from None
                if kind is EntryKind.DIRECTORY:
                    directory_times[relative] = member.mtime
            _expect_end_padding(archive.fileobj)
    except tarfile.TarError as exc:
        raise BadArchive(f"malformed tar data ({exc})") from None
    except EOFError:
        raise BadArchive("the tar stream is truncated") from None
    if reader.read(1):
        raise BadArchive("data follows the tar end-of-archive marker")
    # Directories last: writing their contents changed their mtimes.
    for relative, mtime in directory_times.items():
        if _valid_mtime(mtime):
            os.utime(destination / relative, (mtime, mtime), follow_symlinks=False)
    return UnpackStats(
        entries=budget.entries,
        total_bytes=budget.total_bytes,
        compressed_bytes=reader.bytes_in,
        skipped_symlinks=skipped[EntryKind.SYMLINK],
        skipped_special=skipped[EntryKind.SPECIAL],
        skipped_hardlinks=skipped[EntryKind.HARDLINK],
    )
