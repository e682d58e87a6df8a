"""The archive format and its restore safety rules, without any store.

``HOSTILE`` (built here, reused by the persistence tests) holds one archive per attack.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.codex_home.archive import (
    ArchiveLimits,
    BadArchive,
    EntryKind,
    ExtractBudget,
    PackEntry,
    UnsafeEntry,
    check_member,
    unpack_archive,
    write_archive,
)

DATA = Path(__file__).resolve().parent / "data"
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


def _bomb(archive: tarfile.TarFile) -> None:
    # Every entry is within the per-entry bound; together they exceed the total.
    for index in range(3):
        add_zeros(archive, f"zeros{index}", 4 << 20)


def _traversal(archive: tarfile.TarFile) -> None:
    add_file(archive, "ok")
    add_file(archive, "sessions/../../escape")


HOSTILE: dict[str, bytes] = {
    "traversal": tar_gz(_traversal),
    "absolute": tar_gz(lambda a: add_file(a, "/etc/cron.d/evil")),
    "symlink": tar_gz(lambda a: add_special(a, "link", tarfile.SYMTYPE, "/etc/passwd")),
    "hardlink": tar_gz(lambda a: add_special(a, "hard", tarfile.LNKTYPE, "/etc/passwd")),
    "device": tar_gz(lambda a: add_special(a, "dev", tarfile.CHRTYPE)),
    "fifo": tar_gz(lambda a: add_special(a, "pipe", tarfile.FIFOTYPE)),
    "oversize-entry": tar_gz(lambda a: add_zeros(a, "big", LIMITS.max_entry_bytes + 1)),
    "gzip-bomb": tar_gz(_bomb),
    "too-many-entries": tar_gz(_many),
    "not-gzip": b"this is not an archive",
    "truncated": tar_gz(lambda a: add_file(a, "f", os.urandom(100_000)))[:5_000],
}


def pull_from(data: bytes, chunk: int = 4096) -> Callable[[], bytes]:
    """A ``pull`` callback serving ``data`` in chunks, then ``b""``."""
    pieces: Iterator[bytes] = (data[i : i + chunk] for i in range(0, len(data), chunk))
    return lambda: next(pieces, b"")


# --- check_member: pure rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "type_flag", "reason"),
    [
        ("../x", tarfile.REGTYPE, "'..'"),
        ("a/../../x", tarfile.REGTYPE, "'..'"),
        ("/abs", tarfile.REGTYPE, "absolute"),
        ("l", tarfile.SYMTYPE, "symlink"),
        ("h", tarfile.LNKTYPE, "hardlink"),
        ("c", tarfile.CHRTYPE, "device"),
        ("b", tarfile.BLKTYPE, "device"),
        ("p", tarfile.FIFOTYPE, "fifo"),
        ("s", tarfile.GNUTYPE_SPARSE, "unsupported"),
        (".", tarfile.REGTYPE, "root"),
    ],
)
def test_unsafe_members_are_refused(name: str, type_flag: bytes, reason: str) -> None:
    with pytest.raises(UnsafeEntry, match=reason):
        check_member(name, type_flag, 0)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("config.toml", "config.toml"),
        ("./config.toml", "config.toml"),
        ("sessions/2026/", "sessions/2026"),
        ("a//b/./c", "a/b/c"),
    ],
)
def test_safe_names_are_normalised(name: str, expected: str) -> None:
    checked = check_member(name, tarfile.REGTYPE, 1)
    assert checked == (PurePosixPath(expected), EntryKind.FILE)


def test_root_directory_entries_are_skipped() -> None:
    assert check_member("./", tarfile.DIRTYPE, 0) is None
    assert check_member(".", tarfile.DIRTYPE, 0) is None


def test_budget_counts_entries_and_bytes() -> None:
    budget = ExtractBudget(ArchiveLimits(max_total_bytes=10, max_entries=2, max_entry_bytes=6))
    budget.admit("a", tarfile.REGTYPE, 6)
    with pytest.raises(UnsafeEntry, match="over the 6-byte bound"):
        budget.admit("b", tarfile.REGTYPE, 7)
    budget = ExtractBudget(ArchiveLimits(max_total_bytes=10, max_entries=2, max_entry_bytes=6))
    budget.admit("a", tarfile.REGTYPE, 6)
    with pytest.raises(UnsafeEntry, match="expanded size exceeds 10"):
        budget.admit("b", tarfile.REGTYPE, 5)
    budget = ExtractBudget(ArchiveLimits(max_total_bytes=10, max_entries=2, max_entry_bytes=6))
    budget.admit("a", tarfile.DIRTYPE, 0)
    budget.admit("b", tarfile.DIRTYPE, 0)
    with pytest.raises(UnsafeEntry, match="more than 2 entries"):
        budget.admit("c", tarfile.DIRTYPE, 0)


_names = st.lists(
    st.sampled_from(["a", "b", ".", "/", "..", "\\", "é", "\x00", " ", "~"]), max_size=12
).map("".join) | st.text(max_size=30)


@given(name=_names, directory=st.booleans())
def test_accepted_names_stay_inside_the_root(name: str, directory: bool) -> None:
    type_flag = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    try:
        checked = check_member(name, type_flag, 0)
    except UnsafeEntry:
        return
    if checked is None:
        assert directory
        return
    relative, _ = checked
    root = Path("/restore-root")
    target = Path(os.path.normpath(root / relative))
    assert not relative.is_absolute()
    assert ".." not in relative.parts
    assert target != root
    assert root in target.parents


# --- unpack -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_archives_are_refused(attack: str, tmp_path: Path) -> None:
    with pytest.raises(BadArchive):
        unpack_archive(pull_from(HOSTILE[attack]), tmp_path, LIMITS)


def test_gzip_bomb_stops_at_the_decompressed_cap(tmp_path: Path) -> None:
    # One entry far over every limit; its header alone is refused before any data is written.
    bomb = tar_gz(lambda a: add_zeros(a, "zeros", 64 << 20))
    assert len(bomb) < 128 * 1024
    with pytest.raises(UnsafeEntry, match="over the"):
        unpack_archive(pull_from(bomb), tmp_path, LIMITS)
    assert not (tmp_path / "zeros").exists()


def test_oversized_metadata_record_is_refused(tmp_path: Path) -> None:
    def build(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("x")
        info.pax_headers = {"comment": "y" * (2 << 20)}
        archive.addfile(info)

    with pytest.raises(UnsafeEntry, match="metadata record"):
        unpack_archive(pull_from(tar_gz(build)), tmp_path, LIMITS)


def test_go_fixture_restores_with_private_modes(tmp_path: Path) -> None:
    stats = unpack_archive(pull_from(GO_FIXTURE.read_bytes()), tmp_path, LIMITS)
    assert stats.entries == 10
    rollout = next((tmp_path / "sessions/2026/01/02").iterdir())
    assert rollout.read_text().startswith('{"timestamp"')
    assert (tmp_path / "config.toml").read_text() == 'model = "gpt-5.5"\n'
    for path in tmp_path.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert path.stat().st_mode & 0o777 == expected, path


def test_concatenated_gzip_members_are_one_stream(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        add_file(archive, "a", b"hello")
    data = raw.getvalue()
    two_members = gzip.compress(data[:700], mtime=0) + gzip.compress(data[700:], mtime=0)
    unpack_archive(pull_from(two_members, chunk=100), tmp_path, LIMITS)
    assert (tmp_path / "a").read_bytes() == b"hello"


def test_written_archives_use_go_compatible_names(tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"data")
    entries = [
        PackEntry(name="sessions", kind=EntryKind.DIRECTORY, mode=0o755, mtime=1),
        PackEntry(name="sessions/f", kind=EntryKind.FILE, mode=0o644, mtime=1, source=source),
    ]
    chunks: list[bytes] = []
    write_archive(entries, chunks.append)
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:gz") as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == ["sessions", "sessions/f"]
    assert [m.type for m in members] == [tarfile.DIRTYPE, tarfile.REGTYPE]
    assert members[1].size == 4
    assert not any(m.pax_headers for m in members)


def test_partial_jsonl_line_is_left_for_the_next_save(tmp_path: Path) -> None:
    source = tmp_path / "rollout.jsonl"
    source.write_bytes(b'{"a":1}\n{"b":2}\n{"c"')
    entry = PackEntry(
        name="r.jsonl",
        kind=EntryKind.FILE,
        mode=0o644,
        mtime=1,
        source=source,
        trim_partial_line=True,
    )
    chunks: list[bytes] = []
    write_archive([entry], chunks.append)
    out = tmp_path / "out"
    out.mkdir()
    unpack_archive(pull_from(b"".join(chunks)), out, LIMITS)
    assert (out / "r.jsonl").read_bytes() == b'{"a":1}\n{"b":2}\n'


def test_packing_streams_bounded_chunks(tmp_path: Path) -> None:
    source = tmp_path / "random"
    source.write_bytes(os.urandom(3 << 20))
    entry = PackEntry(name="random", kind=EntryKind.FILE, mode=0o600, mtime=1, source=source)
    sizes: list[int] = []
    total = write_archive([entry], lambda chunk: sizes.append(len(chunk)), chunk_size=64 * 1024)
    assert len(sizes) > 10
    assert max(sizes) < 2 * 64 * 1024
    assert sum(sizes) == total
