"""The archive format and its restore safety rules, without any store.

The archives come from ``gateway_tests.hostile_archives`` (``HOSTILE``: one per attack).
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
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
from gateway_tests.hostile_archives import (
    GO_FIXTURE,
    GOOD,
    HOSTILE,
    LIMITS,
    MTIME,
    PARTIAL,
    SOME_FILES,
    add_bomb,
    add_file,
    add_special,
    add_zeros,
    flip,
    go_tar,
    tar_entries,
    tar_gz,
)


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
        ("../l", tarfile.SYMTYPE, "'..'"),
        ("/dev/c", tarfile.CHRTYPE, "absolute"),
        ("a/../../p", tarfile.FIFOTYPE, "'..'"),
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
        # Only the owner's bits survive: the Go service's 0755 script keeps its owner x bit.
        expected = 0o700 if path.is_dir() or path.name == "hello.sh" else 0o600
        assert path.stat().st_mode & 0o777 == expected, path
        # Every entry keeps the time the Go service recorded, directories included.
        assert path.stat().st_mtime == MTIME, path


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


# --- archives read only in part ---------------------------------------------------------------


@pytest.mark.parametrize("attack", sorted(PARTIAL))
def test_partly_readable_archives_restore_nothing(attack: str, tmp_path: Path) -> None:
    with pytest.raises(BadArchive):
        unpack_archive(pull_from(PARTIAL[attack]), tmp_path, LIMITS)


@pytest.mark.parametrize(
    ("ending", "padding"),
    [("go", 0), ("python-record", 10240 - (len(tar_entries(SOME_FILES)) + 1024) % 10240)],
)
def test_end_of_archive_padding_as_tar_writers_emit_it_is_fine(
    ending: str, padding: int, tmp_path: Path
) -> None:
    # Go's archive/tar writes exactly two zero blocks; Python and GNU tar pad to a record.
    data = gzip.compress(go_tar(SOME_FILES) + bytes(padding), mtime=0)
    unpack_archive(pull_from(data), tmp_path, LIMITS)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == SOME_FILES


def test_an_empty_tar_is_an_empty_home(tmp_path: Path) -> None:
    stats = unpack_archive(pull_from(gzip.compress(bytes(1024))), tmp_path, LIMITS)
    assert stats.entries == 0 and list(tmp_path.iterdir()) == []


def _restored(data: bytes, target: Path) -> dict[str, bytes] | None:
    """What ``data`` restores into ``target`` (``None``: refused)."""
    target.mkdir()
    try:
        unpack_archive(pull_from(data, chunk=997), target, LIMITS)
    except BadArchive:
        return None
    return {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*")}


_counter = iter(range(1 << 30))


def bounded(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Hypothesis settings for the archive properties: a bounded count, no deadline."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def _fresh(tmp_path: Path) -> Path:
    return tmp_path / f"t{next(_counter)}"


@bounded(60)
@given(cut=st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_every_truncation_of_the_compressed_stream_is_refused(cut: int, tmp_path: Path) -> None:
    assert _restored(GOOD[:cut], _fresh(tmp_path)) is None


_TAR = go_tar(SOME_FILES)
_END_OF_ENTRIES = len(tar_entries(SOME_FILES))


@bounded(60)
@given(cut=st.integers(min_value=0, max_value=len(_TAR)))
def test_a_tar_cut_short_restores_only_with_its_whole_end_marker(cut: int, tmp_path: Path) -> None:
    restored = _restored(gzip.compress(_TAR[:cut], mtime=0), _fresh(tmp_path))
    if cut >= _END_OF_ENTRIES + 2 * tarfile.BLOCKSIZE:
        assert restored == SOME_FILES
    else:
        assert restored is None


@bounded(60)
@given(junk=st.binary(min_size=1, max_size=3000).filter(lambda b: b.count(0) != len(b)))
def test_anything_but_zeros_after_the_end_marker_is_refused(junk: bytes, tmp_path: Path) -> None:
    assert _restored(gzip.compress(_TAR + junk, mtime=0), _fresh(tmp_path)) is None


@bounded(60)
@given(junk=st.binary(min_size=1, max_size=300).filter(lambda b: not b.startswith(b"\x1f\x8b")))
def test_anything_after_the_gzip_trailer_is_refused(junk: bytes, tmp_path: Path) -> None:
    assert _restored(GOOD + junk, _fresh(tmp_path)) is None


@bounded(80)
@given(index=st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_a_corrupted_byte_never_restores_a_different_home(index: int, tmp_path: Path) -> None:
    # Header fields outside the CRC (gzip mtime, OS) may change harmlessly; everything else is
    # caught by inflate, the tar checks or the gzip trailer.
    assert _restored(flip(GOOD, index), _fresh(tmp_path)) in (None, SOME_FILES)


# --- links, fifos and devices ------------------------------------------------------------------


def _codex_leftovers(archive: tarfile.TarFile) -> None:
    add_file(archive, "config.toml", b"model = 'm'\n")
    add_special(archive, "tmp/arg0-linux/abc/apply_patch", tarfile.SYMTYPE, "/usr/bin/codex")
    add_special(archive, "tmp/pipe", tarfile.FIFOTYPE)
    add_special(archive, "dev-null", tarfile.CHRTYPE)
    add_special(archive, "disk", tarfile.BLKTYPE)


def test_symlinks_fifos_and_devices_are_skipped_and_counted(tmp_path: Path) -> None:
    stats = unpack_archive(pull_from(tar_gz(_codex_leftovers)), tmp_path, LIMITS)
    assert (stats.skipped_symlinks, stats.skipped_special, stats.skipped_hardlinks) == (1, 3, 0)
    assert stats.skipped == 4
    created = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert created == ["config.toml"]
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))


def test_a_file_behind_a_skipped_symlink_stays_inside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    home = tmp_path / "home"
    home.mkdir()

    def build(archive: tarfile.TarFile) -> None:
        add_special(archive, "escape", tarfile.SYMTYPE, str(outside))
        add_file(archive, "escape/planted", b"gotcha")
        add_special(archive, "hard", tarfile.LNKTYPE, "escape/planted")

    unpack_archive(pull_from(tar_gz(build)), home, LIMITS)
    assert list(outside.iterdir()) == []
    assert (home / "escape").is_dir() and not (home / "escape").is_symlink()
    assert (home / "escape/planted").read_bytes() == b"gotcha"
    # The hard link names a file this archive restored: it is one, inside the home.
    assert os.path.samefile(home / "hard", home / "escape/planted")


def test_hard_links_to_restored_files_are_links_and_cost_their_size(tmp_path: Path) -> None:
    def build(archive: tarfile.TarFile) -> None:
        add_file(archive, "a", b"x" * 1000)
        add_special(archive, "sub/b", tarfile.LNKTYPE, "a")
        add_special(archive, "dangling", tarfile.LNKTYPE, "missing")
        add_file(archive, "a", b"replaced")  # a later entry replaces the name, not the link

    stats = unpack_archive(pull_from(tar_gz(build)), tmp_path, LIMITS)
    assert (tmp_path / "sub/b").read_bytes() == b"x" * 1000
    assert (tmp_path / "a").read_bytes() == b"replaced"
    assert not (tmp_path / "dangling").exists()
    assert stats.skipped_hardlinks == 1
    assert stats.total_bytes == 1000 + 1000 + len(b"replaced")


def test_hard_link_fan_out_is_refused_at_the_total(tmp_path: Path) -> None:
    # Each link is saved back as a whole file, so links are charged like copies.
    def build(archive: tarfile.TarFile) -> None:
        add_zeros(archive, "big", 4 << 20)
        for index in range(3):
            add_special(archive, f"l{index}", tarfile.LNKTYPE, "big")

    with pytest.raises(UnsafeEntry, match="expanded size exceeds"):
        unpack_archive(pull_from(tar_gz(build)), tmp_path, LIMITS)


def test_a_hard_link_to_a_directory_is_skipped(tmp_path: Path) -> None:
    def build(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("d")
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
        add_special(archive, "l", tarfile.LNKTYPE, "d")

    stats = unpack_archive(pull_from(tar_gz(build)), tmp_path, LIMITS)
    assert stats.skipped_hardlinks == 1 and not (tmp_path / "l").exists()


# --- times and modes ---------------------------------------------------------------------------


def test_restore_keeps_mtimes_and_only_the_owner_mode_bits(tmp_path: Path) -> None:
    def build(archive: tarfile.TarFile) -> None:
        for name, mode, mtime in [
            ("sessions", 0o755, 1_700_000_000),
            ("sessions/r.jsonl", 0o644, 1_700_000_100),
            ("bin-tool", 0o6777, 1_700_000_200),
            ("read-only", 0o400, 1_700_000_300),
            ("odd-time", 0o600, 1 << 40),
        ]:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, mtime
            if name == "sessions":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = 1
                archive.addfile(info, io.BytesIO(b"x"))

    unpack_archive(pull_from(tar_gz(build)), tmp_path, LIMITS)

    def mode(name: str) -> int:
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    def mtime(name: str) -> float:
        return (tmp_path / name).stat().st_mtime

    assert (mode("sessions"), mtime("sessions")) == (0o700, 1_700_000_000)
    assert (mode("sessions/r.jsonl"), mtime("sessions/r.jsonl")) == (0o600, 1_700_000_100)
    assert (mode("bin-tool"), mtime("bin-tool")) == (0o700, 1_700_000_200)
    assert (mode("read-only"), mtime("read-only")) == (0o600, 1_700_000_300)
    # A time no file system holds is not applied: the file just gets the time of the restore.
    assert mode("odd-time") == 0o600 and mtime("odd-time") < 1 << 34


# --- gzip bombs -----------------------------------------------------------------------------


RATIO_LIMITS = attrs.evolve(LIMITS, max_ratio=20, ratio_floor=1 << 20)


def test_a_bomb_is_refused_on_its_declared_size_before_anything_is_written(
    tmp_path: Path,
) -> None:
    bomb = tar_gz(add_bomb)
    with pytest.raises(UnsafeEntry, match="CXG_RESTORE_MAX_RATIO"):
        unpack_archive(pull_from(bomb), tmp_path, RATIO_LIMITS, compressed_size=len(bomb))
    assert list(tmp_path.iterdir()) == []


def test_the_ratio_bound_leaves_ordinary_archives_and_small_homes_alone(tmp_path: Path) -> None:
    # 1 MiB of zeros compresses ~1000:1 but stays under the floor.
    small = tar_gz(lambda a: add_zeros(a, "zeros", 1 << 20))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    unpack_archive(pull_from(small), tmp_path / "a", RATIO_LIMITS, compressed_size=len(small))
    ordinary = tar_gz(lambda a: add_file(a, "random", os.urandom(3 << 20)))
    unpack_archive(pull_from(ordinary), tmp_path / "b", RATIO_LIMITS, compressed_size=len(ordinary))
    assert (tmp_path / "b" / "random").stat().st_size == 3 << 20


@bounded(40)
@given(sizes=st.lists(st.integers(min_value=0, max_value=3 << 20), min_size=1, max_size=6))
def test_no_archive_expands_past_the_ratio_bound(sizes: list[int], tmp_path: Path) -> None:
    def build(archive: tarfile.TarFile) -> None:
        for index, size in enumerate(sizes):
            add_zeros(archive, f"z{index}", size)

    data = tar_gz(build)
    target = _fresh(tmp_path)
    target.mkdir()
    bound = RATIO_LIMITS.max_expanded_bytes(len(data))
    try:
        stats = unpack_archive(pull_from(data), target, RATIO_LIMITS, compressed_size=len(data))
    except UnsafeEntry:
        assert sum(sizes) > bound
        written = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        assert written <= bound
    else:
        assert sum(sizes) <= bound and stats.total_bytes == sum(sizes)


def test_a_name_too_long_to_create_is_the_archives_fault(tmp_path: Path) -> None:
    too_long = "x" * 300 + "/f"
    data = tar_gz(lambda a: add_file(a, too_long))
    with pytest.raises(UnsafeEntry, match="name too long"):
        unpack_archive(pull_from(data), tmp_path, LIMITS)


def test_implied_parent_directories_count_as_entries(tmp_path: Path) -> None:
    # Fifty entries of deep, distinct names would otherwise make hundreds of directories.
    def build(archive: tarfile.TarFile) -> None:
        for index in range(LIMITS.max_entries // 5):
            add_file(archive, f"{index}/a/b/c/d/f")

    with pytest.raises(UnsafeEntry, match="directories included"):
        unpack_archive(pull_from(tar_gz(build)), tmp_path, LIMITS)
    # Within the bound they restore: 5 entries' worth of paths for one file.
    target = tmp_path / "ok"
    target.mkdir()
    stats = unpack_archive(pull_from(tar_gz(lambda a: add_file(a, "a/b/c/d/f"))), target, LIMITS)
    assert stats.entries == 5 and (target / "a/b/c/d/f").is_file()
