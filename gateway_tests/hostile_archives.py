"""Archives built entry by entry for the restore tests, and one archive per attack.

``HOSTILE`` holds one archive per attack against ``LIMITS``; ``PARTIAL`` the archives a restore
could read only in part. The archive tests and the persistence tests (with a store, and through
the gateway) share them.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from gateway.codex_home.archive import ArchiveLimits

DATA = Path(__file__).resolve().parent / "data"
MTIME = 1767312000  # the Go fixture's times (make_go_fixture.py)
GO_FIXTURE = DATA / "go-format-home.tar.gz"
LIMITS = ArchiveLimits(max_total_bytes=10 * 1024 * 1024, max_entries=50, max_entry_bytes=4 << 20)


def tar_gz(build: Callable[[tarfile.TarFile], None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A gzip tar written by ``build``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as archive:
        build(archive)
    return gzip.compress(raw.getvalue(), mtime=0)


def add_file(archive: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    """Add a regular file entry."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def add_special(archive: tarfile.TarFile, name: str, type_flag: bytes, link: str = "") -> None:
    """Add a link, device or fifo entry."""
    info = tarfile.TarInfo(name)
    info.type = type_flag
    info.linkname = link
    archive.addfile(info)


def add_zeros(archive: tarfile.TarFile, name: str, size: int) -> None:
    """Add a file of ``size`` zero bytes without holding it in memory."""

    class Zeros(io.RawIOBase):
        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            buffer[:] = bytes(len(buffer))
            return len(buffer)

    info = tarfile.TarInfo(name)
    info.size = size
    archive.addfile(info, Zeros())


def _many(archive: tarfile.TarFile) -> None:
    for index in range(LIMITS.max_entries + 1):
        add_file(archive, f"f{index}")


def add_bomb(archive: tarfile.TarFile) -> None:
    """Entries each within the per-entry bound of ``LIMITS`` that together exceed its total."""
    for index in range(3):
        add_zeros(archive, f"zeros{index}", 4 << 20)


def _traversal(archive: tarfile.TarFile) -> None:
    add_file(archive, "ok")
    add_file(archive, "sessions/../../escape")


def tar_entries(files: dict[str, bytes]) -> bytes:
    """The entries of ``files`` as tar blocks, with no end-of-archive marker at all."""
    out = bytearray()
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 1767312000
        out += info.tobuf(tarfile.USTAR_FORMAT)
        out += data + bytes(-len(data) % tarfile.BLOCKSIZE)
    return bytes(out)


def go_tar(files: dict[str, bytes]) -> bytes:
    """A tar ended as Go's ``archive/tar`` ends it: exactly two zero blocks, no record padding."""
    return tar_entries(files) + bytes(2 * tarfile.BLOCKSIZE)


SOME_FILES = {"config.toml": b'model = "m"\n', "history.jsonl": b'{"text":"hi"}\n' * 50}


def flip(data: bytes, index: int) -> bytes:
    """``data`` with the byte at ``index`` inverted."""
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]


GOOD = gzip.compress(go_tar(SOME_FILES), mtime=0)

# Archives a restore could read only in part: each must be refused as a whole.
PARTIAL: dict[str, bytes] = {
    "garbage-after-entries": gzip.compress(tar_entries(SOME_FILES) + os.urandom(4096), mtime=0),
    "two-tars": gzip.compress(go_tar(SOME_FILES) + go_tar({"more": b"lost"}), mtime=0),
    "two-gzipped-tars": GOOD + gzip.compress(go_tar({"more": b"lost"}), mtime=0),
    "gzip-not-tar": gzip.compress(os.urandom(20_000), mtime=0),
    "gzip-of-text": gzip.compress(b"hello, this is not a tar archive\n" * 100, mtime=0),
    "gzip-without-trailer": GOOD[:-8],
    "gzip-half-trailer": GOOD[:-3],
    "bad-gzip-crc": flip(GOOD, len(GOOD) - 8),
    "bad-gzip-length": flip(GOOD, len(GOOD) - 1),
    "no-end-of-archive-marker": gzip.compress(tar_entries(SOME_FILES), mtime=0),
    "lone-zero-block": gzip.compress(tar_entries(SOME_FILES) + bytes(512), mtime=0),
    "garbage-after-gzip": GOOD + b"trailing junk",
    "empty-gzip": gzip.compress(b"", mtime=0),
}

HOSTILE: dict[str, bytes] = {
    "traversal": tar_gz(_traversal),
    "absolute": tar_gz(lambda a: add_file(a, "/etc/cron.d/evil")),
    "symlink-named-out": tar_gz(lambda a: add_special(a, "../link", tarfile.SYMTYPE, "x")),
    "hardlink-out": tar_gz(lambda a: add_special(a, "hard", tarfile.LNKTYPE, "/etc/passwd")),
    "hardlink-up": tar_gz(lambda a: add_special(a, "hard", tarfile.LNKTYPE, "../x")),
    "fifo-named-out": tar_gz(lambda a: add_special(a, "/tmp/pipe", tarfile.FIFOTYPE)),
    "oversize-entry": tar_gz(lambda a: add_zeros(a, "big", LIMITS.max_entry_bytes + 1)),
    "gzip-bomb": tar_gz(add_bomb),
    "too-many-entries": tar_gz(_many),
    "not-gzip": b"this is not an archive",
    "truncated": tar_gz(lambda a: add_file(a, "f", os.urandom(100_000)))[:5_000],
    **PARTIAL,
}
