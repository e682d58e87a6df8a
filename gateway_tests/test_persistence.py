"""The persistence facade against a real S3-compatible server (moto on loopback)."""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import tarfile
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from gateway.codex_home.persistence import (
    Generation,
    HostileArchive,
    Persistence,
    PersistenceError,
    PersistenceUnavailable,
    RefusalMemo,
    StaleSnapshot,
    UnrestorableHome,
    open_object_store,
)
from gateway.config import RestoreLimits, S3Settings, load_config
from gateway.store.base import (
    ObjectStore,
    PreconditionFailed,
    StoredObject,
    StoreUnavailable,
    archive_key,
)
from gateway.store.local import LocalDirectoryStore
from gateway.store.s3 import MIN_PART_SIZE, S3ObjectStore
from gateway_tests.hostile_archives import GO_FIXTURE, HOSTILE, LIMITS
from gateway_tests.s3_server import BUCKET, MotoServer

WS = "ws-42"
KEY = archive_key(WS)
RESTORE_LIMITS = RestoreLimits(
    max_total_bytes=LIMITS.max_total_bytes, max_entries=LIMITS.max_entries
)


@attrs.define
class RecordingStore:
    """A real store, with a record of the writes that reached it and their chunk sizes."""

    inner: ObjectStore
    writes: int = 0
    chunk_sizes: list[int] = attrs.Factory(list)

    def describe(self) -> str:
        return self.inner.describe()

    async def check(self) -> None:
        await self.inner.check()

    def open_read(self, key: str) -> AbstractAsyncContextManager[StoredObject]:
        return self.inner.open_read(key)

    async def write(
        self, key: str, chunks: AsyncIterable[bytes], *, expected_generation: str | None
    ) -> str:
        self.writes += 1

        async def recorded() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                self.chunk_sizes.append(len(chunk))
                yield chunk

        return await self.inner.write(key, recorded(), expected_generation=expected_generation)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def s3_store(s3_settings: S3Settings) -> AsyncIterator[RecordingStore]:
    store = S3ObjectStore(s3_settings, part_size=MIN_PART_SIZE, max_attempts=1)
    yield RecordingStore(store)
    await store.aclose()


def persistence(store: ObjectStore, limits: RestoreLimits = RESTORE_LIMITS) -> Persistence:
    return Persistence(store, limits, max_entry_bytes=LIMITS.max_entry_bytes)


def make_home(root: Path) -> Path:
    """A small CODEX_HOME like the one codex writes."""
    home = root / "codex-home"
    rollouts = home / "sessions" / "2026" / "01" / "02"
    rollouts.mkdir(parents=True)
    (rollouts / "rollout-2026-01-02T00-00-00-abc.jsonl").write_text('{"type":"session_meta"}\n')
    (home / "config.toml").write_text('model = "gpt-5.5"\n')
    (home / "history.jsonl").write_text('{"text":"hi"}\n')
    return home


def make_sparse(path: Path, size: int) -> None:
    """A file of ``size`` zero bytes that takes no disk space."""
    with open(path, "wb") as file:
        file.truncate(size)


def listing(home: Path) -> dict[str, bytes | None]:
    """Every path under ``home`` with its content (``None`` for directories)."""
    return {
        str(path.relative_to(home)): None if path.is_dir() else path.read_bytes()
        for path in sorted(home.rglob("*"))
    }


async def stored_bytes(moto: MotoServer) -> tuple[str, bytes]:
    response = moto.boto_client().get_object(Bucket=BUCKET, Key=KEY)
    return response["ETag"], response["Body"].read()


def stored_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return archive.getmembers()


async def test_round_trip_and_unchanged_home_uploads_nothing(
    s3_store: RecordingStore, tmp_path: Path
) -> None:
    home = make_home(tmp_path / "a")
    saved = await persistence(s3_store).save(WS, home, Generation(stored=None))
    assert saved.stored is not None and saved.size
    assert s3_store.writes == 1

    again = await persistence(s3_store).save(WS, home, saved)
    assert again is saved
    assert s3_store.writes == 1

    target = tmp_path / "b" / "codex-home"
    restored = await persistence(s3_store).restore(WS, target)
    assert restored.stored == saved.stored
    assert listing(target) == listing(home)
    # Nothing changed after the restore either: the next checkpoint uploads nothing.
    assert await persistence(s3_store).save(WS, target, restored) is restored
    assert s3_store.writes == 1

    (target / "history.jsonl").write_text('{"text":"hi"}\n{"text":"again"}\n')
    changed = await persistence(s3_store).save(WS, target, restored)
    assert changed.stored != restored.stored
    assert s3_store.writes == 2


async def test_no_object_restores_an_empty_home(s3_store: RecordingStore, tmp_path: Path) -> None:
    target = tmp_path / "codex-home"
    generation = await persistence(s3_store).restore(WS, target)
    assert generation.stored is None
    assert target.is_dir() and listing(target) == {}
    assert target.stat().st_mode & 0o777 == 0o700
    # An empty home that stayed empty is not uploaded.
    assert await persistence(s3_store).save(WS, target, generation) is generation
    assert s3_store.writes == 0


async def test_archive_is_go_compatible_and_holds_no_runtime_files(
    s3_store: RecordingStore,
    moto_server: MotoServer,
    tmp_path: Path,
) -> None:
    home = make_home(tmp_path)
    (home / "app-server-control").mkdir()
    (home / "app-server-control" / "app-server-startup.lock").write_text("")
    (home / "app-server-daemon").mkdir()
    (home / "app-server-daemon" / "codex.pid").write_text("123")
    (home / "tmp" / "arg0").mkdir(parents=True)
    (home / "tmp" / "arg0" / "apply_patch").symlink_to("/bin/true")
    (home / ".tmp").mkdir()
    (home / ".tmp" / "plugins.sync.lock").write_text("")
    (home / "model-token").write_text("secret-token")
    (home / "link-to-config").symlink_to(home / "config.toml")
    os.mkfifo(home / "fifo")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(home / "s"))
        await persistence(s3_store).save(WS, home, Generation(stored=None))

    _, data = await stored_bytes(moto_server)
    members = stored_members(data)
    names = [member.name for member in members]
    assert names == [
        "config.toml",
        "history.jsonl",
        "sessions",
        "sessions/2026",
        "sessions/2026/01",
        "sessions/2026/01/02",
        "sessions/2026/01/02/rollout-2026-01-02T00-00-00-abc.jsonl",
    ]
    assert all(m.type in (tarfile.REGTYPE, tarfile.DIRTYPE) for m in members)
    assert [m.name for m in members if m.isdir()] == [
        "sessions",
        "sessions/2026",
        "sessions/2026/01",
        "sessions/2026/01/02",
    ]


async def test_go_fixture_restores(s3_store: RecordingStore, tmp_path: Path) -> None:
    async def fixture() -> AsyncIterator[bytes]:
        yield GO_FIXTURE.read_bytes()

    etag = await s3_store.write(KEY, fixture(), expected_generation=None)
    target = tmp_path / "codex-home"
    generation = await persistence(s3_store).restore(WS, target)
    assert generation.stored == etag
    assert (target / "config.toml").read_text() == 'model = "gpt-5.5"\n'
    with sqlite3.connect(target / "state_5.sqlite") as db:
        assert db.execute("SELECT title FROM threads").fetchall() == [("from the Go gateway",)]


@pytest.mark.parametrize("attack", sorted(HOSTILE))
async def test_hostile_archive_is_refused_and_left_untouched(
    attack: str,
    s3_store: RecordingStore,
    moto_server: MotoServer,
    tmp_path: Path,
) -> None:
    async def hostile() -> AsyncIterator[bytes]:
        yield HOSTILE[attack]

    await s3_store.write(KEY, hostile(), expected_generation=None)
    before = await stored_bytes(moto_server)
    parent = tmp_path / "sessions"
    target = parent / "codex-home"

    with pytest.raises(HostileArchive, match=KEY) as raised:
        await persistence(s3_store).restore(WS, target)
    assert "untouched" in str(raised.value)

    assert await stored_bytes(moto_server) == before
    assert os.listdir(parent) == ["codex-home"]
    assert listing(target) == {}
    # Another workspace restores normally from the same store.
    other = await persistence(s3_store).restore("other-ws", tmp_path / "other")
    assert other.stored is None


async def test_stale_writer_is_rejected_and_newer_snapshot_survives(
    s3_store: RecordingStore, tmp_path: Path
) -> None:
    home = make_home(tmp_path / "first")
    base = await persistence(s3_store).save(WS, home, Generation(stored=None))

    # Two sessions restored the same generation: a zombie and its replacement.
    zombie = tmp_path / "zombie" / "codex-home"
    zombie_generation = await persistence(s3_store).restore(WS, zombie)
    current = tmp_path / "current" / "codex-home"
    current_generation = await persistence(s3_store).restore(WS, current)
    assert zombie_generation.stored == current_generation.stored == base.stored

    (current / "history.jsonl").write_text('{"text":"newer"}\n')
    newer = await persistence(s3_store).save(WS, current, current_generation)

    (zombie / "history.jsonl").write_text('{"text":"stale"}\n')
    with pytest.raises(StaleSnapshot, match=KEY) as raised:
        await persistence(s3_store).save(WS, zombie, zombie_generation)
    assert isinstance(raised.value, PreconditionFailed)

    check = tmp_path / "check" / "codex-home"
    restored = await persistence(s3_store).restore(WS, check)
    assert restored.stored == newer.stored
    assert (check / "history.jsonl").read_text() == '{"text":"newer"}\n'


async def test_stale_large_writer_is_rejected(s3_store: RecordingStore, tmp_path: Path) -> None:
    """The multipart path fences too (moto ignores conditions on completion; see the store)."""
    # Limits that admit a file larger than one part.
    roomy = Persistence(s3_store, RestoreLimits(max_total_bytes=64 << 20, max_entries=50))
    home = make_home(tmp_path / "a")
    first = await roomy.save(WS, home, Generation(stored=None))
    (home / "history.jsonl").write_text("changed\n")
    await roomy.save(WS, home, first)

    (home / "random.bin").write_bytes(os.urandom(MIN_PART_SIZE + 4096))
    with pytest.raises(StaleSnapshot):
        await roomy.save(WS, home, first)


async def test_store_down_at_restore_is_unavailable_and_starts_nothing(
    closed_port_settings: S3Settings,
    tmp_path: Path,
) -> None:
    store = S3ObjectStore(closed_port_settings, max_attempts=1, timeout=2)
    target = tmp_path / "codex-home"
    with pytest.raises(PersistenceUnavailable, match=KEY) as raised:
        await persistence(store).restore(WS, target)
    assert isinstance(raised.value, StoreUnavailable)
    assert listing(target) == {}
    await store.aclose()


async def test_store_down_at_save_keeps_the_local_copy(
    s3_settings: S3Settings,
    moto_server: MotoServer,
    tmp_path: Path,
) -> None:
    store = S3ObjectStore(s3_settings, max_attempts=1, timeout=2)
    home = make_home(tmp_path)
    before = listing(home)
    generation = await persistence(store).restore(WS, tmp_path / "restored")

    # The same bucket, seen through a port where nobody answers: S3 is down.
    down = S3ObjectStore(
        attrs.evolve(s3_settings, endpoint=_closed_endpoint()), max_attempts=1, timeout=2
    )
    with pytest.raises(PersistenceUnavailable, match=KEY):
        await persistence(down).save(WS, home, generation)
    assert listing(home) == before

    # S3 is back: the retry with the same generation succeeds and nothing was lost.
    saved = await persistence(store).save(WS, home, generation)
    check = tmp_path / "check"
    await persistence(store).restore(WS, check)
    assert listing(check) == before
    assert saved.stored is not None
    await down.aclose()
    await store.aclose()


def _closed_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


async def test_live_sqlite_in_wal_mode_is_captured_consistently(
    s3_store: RecordingStore, tmp_path: Path
) -> None:
    home = make_home(tmp_path / "a")
    live = sqlite3.connect(home / "state_5.sqlite", isolation_level=None)
    live.execute("PRAGMA journal_mode=WAL")
    live.execute("PRAGMA wal_autocheckpoint=0")
    live.execute("CREATE TABLE threads (id INTEGER PRIMARY KEY, title TEXT)")
    live.executemany("INSERT INTO threads (title) VALUES (?)", [(f"t{i}",) for i in range(500)])
    # A transaction still open at snapshot time: it must not appear.
    live.execute("BEGIN")
    live.execute("INSERT INTO threads (title) VALUES ('uncommitted')")
    assert (home / "state_5.sqlite-wal").stat().st_size > 0

    saved = await persistence(s3_store).save(WS, home, Generation(stored=None))
    live.execute("ROLLBACK")

    target = tmp_path / "b" / "codex-home"
    await persistence(s3_store).restore(WS, target)
    assert not (target / "state_5.sqlite-wal").exists()
    assert not (target / "state_5.sqlite-shm").exists()
    with sqlite3.connect(target / "state_5.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM threads").fetchone() == (500,)

    # A new commit lands only in the WAL; the fingerprint sees it and the next save uploads.
    live.execute("INSERT INTO threads (title) VALUES ('later')")
    later = await persistence(s3_store).save(WS, home, saved)
    assert later.stored != saved.stored
    live.close()


async def test_large_home_streams_through_bounded_chunks(
    s3_store: RecordingStore, tmp_path: Path
) -> None:
    home = make_home(tmp_path / "a")
    make_sparse(home / "logs_2.sqlite-like.bin", 200 << 20)
    (home / "random.bin").write_bytes(os.urandom(MIN_PART_SIZE + (1 << 20)))
    limits = RestoreLimits(max_total_bytes=512 << 20, max_entries=100)

    saved = await Persistence(s3_store, limits).save(WS, home, Generation(stored=None))

    # Multipart (the ETag of a multipart object ends in -<parts>), fed in small chunks.
    assert saved.stored is not None and saved.stored.strip('"').endswith("-2")
    assert len(s3_store.chunk_sizes) > 20
    assert max(s3_store.chunk_sizes) <= 1 << 20

    target = tmp_path / "b" / "codex-home"
    await Persistence(s3_store, limits).restore(WS, target)
    assert (target / "logs_2.sqlite-like.bin").stat().st_size == 200 << 20
    assert (target / "random.bin").read_bytes() == (home / "random.bin").read_bytes()


async def test_restore_refuses_a_non_empty_target(s3_store: RecordingStore, tmp_path: Path) -> None:
    target = tmp_path / "codex-home"
    target.mkdir()
    (target / "leftover").write_text("x")
    with pytest.raises(PersistenceError, match="not empty"):
        await persistence(s3_store).restore(WS, target)


async def test_local_store_round_trip_and_fencing(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path / "store")
    home = make_home(tmp_path / "a")
    first = await persistence(store).save(WS, home, Generation(stored=None))
    (home / "history.jsonl").write_text("more\n")
    await persistence(store).save(WS, home, first)
    (home / "history.jsonl").write_text("stale\n")
    with pytest.raises(StaleSnapshot):
        await persistence(store).save(WS, home, first)
    target = tmp_path / "b" / "codex-home"
    await persistence(store).restore(WS, target)
    assert (target / "history.jsonl").read_text() == "more\n"


def test_open_object_store_follows_the_configuration(tmp_path: Path) -> None:
    base = {"CXG_INBOUND_HMAC_SECRET": "x", "CXG_LOCAL_STORE_DIR": str(tmp_path)}
    local = open_object_store(load_config(base))
    assert isinstance(local, LocalDirectoryStore) and local.root == tmp_path
    s3 = open_object_store(
        load_config({**base, "CXG_S3_BUCKET": "b-1", "CXG_S3_ENDPOINT": "http://127.0.0.1:9"})
    )
    assert isinstance(s3, S3ObjectStore) and s3.describe() == "s3://b-1 at http://127.0.0.1:9"


async def test_cancelled_save_and_restore_end_promptly_and_change_nothing(
    s3_store: RecordingStore, tmp_path: Path
) -> None:
    home = make_home(tmp_path / "a")
    first = await persistence(s3_store).save(WS, home, Generation(stored=None))
    make_sparse(home / "big.bin", 64 << 20)
    (home / "random.bin").write_bytes(os.urandom(MIN_PART_SIZE))
    limits = RestoreLimits(max_total_bytes=512 << 20, max_entries=100)

    with trio.move_on_after(0.2) as scope:
        await Persistence(s3_store, limits).save(WS, home, first)
    assert scope.cancelled_caught
    target = tmp_path / "b" / "codex-home"
    restored = await persistence(s3_store).restore(WS, target)
    assert restored.stored == first.stored

    second = await Persistence(s3_store, limits).save(WS, home, first)
    other = tmp_path / "c" / "codex-home"
    with trio.move_on_after(0.2) as scope:
        await Persistence(s3_store, limits).restore(WS, other)
    assert scope.cancelled_caught
    assert listing(other) == {}
    assert os.listdir(other.parent) == ["codex-home"]
    assert second.stored != first.stored


@attrs.define
class CountingReads:
    """A real store that counts the body bytes restores read from it."""

    inner: ObjectStore
    bytes_read: int = 0

    def describe(self) -> str:
        return self.inner.describe()

    async def check(self) -> None:
        await self.inner.check()

    @asynccontextmanager
    async def open_read(self, key: str) -> AsyncIterator[StoredObject]:
        async with self.inner.open_read(key) as stored:
            outer = self

            @attrs.define
            class Counted:
                generation: str = stored.generation
                size: int | None = stored.size

                async def chunks(self) -> AsyncIterator[bytes]:
                    async for chunk in stored.chunks():
                        outer.bytes_read += len(chunk)
                        yield chunk

            yield Counted()

    async def write(
        self, key: str, chunks: AsyncIterable[bytes], *, expected_generation: str | None
    ) -> str:
        return await self.inner.write(key, chunks, expected_generation=expected_generation)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_refused_archive_is_refused_at_once_until_the_object_changes(
    tmp_path: Path,
) -> None:
    local = LocalDirectoryStore(tmp_path / "store")
    store = CountingReads(local)
    facade = persistence(store)

    async def body(data: bytes) -> AsyncIterator[bytes]:
        yield data

    bad = await local.write(KEY, body(HOSTILE["garbage-after-entries"]), expected_generation=None)
    with pytest.raises(HostileArchive, match=r"data follows|malformed") as first:
        await facade.restore(WS, tmp_path / "a")
    read_once = store.bytes_read
    assert read_once > 0

    with pytest.raises(HostileArchive) as again:
        await facade.restore(WS, tmp_path / "b")
    assert str(again.value) == str(first.value)
    assert store.bytes_read == read_once, "the remembered refusal must not read the object"

    # The object changes (an operator put a good archive back): it is read and restored.
    home = make_home(tmp_path / "good")
    await persistence(local).save(WS, home, Generation(stored=bad))
    await facade.restore(WS, tmp_path / "c" / "codex-home")
    assert listing(tmp_path / "c" / "codex-home") == listing(home)
    assert len(facade.refusals) == 0


def test_the_refusal_memo_is_bounded_and_forgets_the_least_recent() -> None:
    memo = RefusalMemo(capacity=3)
    for index in range(3):
        memo.remember(f"k{index}", "g", f"refused {index}")
    assert memo.get("k0", "g") == "refused 0"  # k0 is now the most recent
    memo.remember("k3", "g", "refused 3")
    assert len(memo) == 3
    assert memo.get("k1", "g") is None
    assert [memo.get(f"k{i}", "g") for i in (0, 2, 3)] == ["refused 0", "refused 2", "refused 3"]
    assert memo.get("k0", "other generation") is None
    assert len(memo) == 2


@pytest.mark.parametrize("past", ["entries", "entry_bytes", "total_bytes", "ratio"])
async def test_a_home_past_the_restore_limits_is_not_saved_over_a_restorable_snapshot(
    past: str, s3_store: RecordingStore, moto_server: MotoServer, tmp_path: Path
) -> None:
    limits = RestoreLimits(max_total_bytes=4 << 20, max_entries=20, max_ratio=10)
    saver = Persistence(s3_store, limits, max_entry_bytes=1 << 20)
    saver.archive_limits = attrs.evolve(saver.archive_limits, ratio_floor=64 << 10)
    home = make_home(tmp_path / "a")
    saved = await saver.save(WS, home, Generation(stored=None))
    before = await stored_bytes(moto_server)

    if past == "entries":
        for index in range(20):
            (home / f"note-{index}.txt").write_text("x")
    elif past == "entry_bytes":
        (home / "large.bin").write_bytes(os.urandom((1 << 20) + 1))
    elif past == "total_bytes":
        for index in range(5):
            (home / f"part-{index}.bin").write_bytes(os.urandom(1 << 20))
    else:
        # Compresses far beyond ten times: restoring it would be refused as a bomb.
        (home / "zeros.bin").write_bytes(bytes(1 << 20))

    with pytest.raises(UnrestorableHome, match="restore limits") as refused:
        await saver.save(WS, home, saved)
    assert KEY in str(refused.value)
    assert await stored_bytes(moto_server) == before
    # What is stored still restores, under the very same limits.
    restored = await saver.restore(WS, tmp_path / "b" / "codex-home")
    assert restored.stored == saved.stored
