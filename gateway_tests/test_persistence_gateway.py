"""Durable CODEX_HOME through the whole gateway against a real S3 server (issue 3, SPEC §5, §8).

Every test runs the real daemon (in-process, or as ``python -m gateway serve`` where a SIGKILL
is the point) against moto's server on loopback. Where S3 must fail, the daemon reaches it
through ``S3Outage``, a proxy the test takes down and brings back; what is stored is read behind
the gateway's back with boto3 (``BucketView``). The bucket keeps every version, so "uploaded
nothing" is counted, not guessed.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import signal
import sqlite3
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import trio
from prometheus_client import REGISTRY

from gateway.config import S3Settings
from gateway.store.base import archive_key
from gateway_tests.daemon_process import client, daemon_env, serve_process
from gateway_tests.harness import (
    RunningGateway,
    bearer,
    connect,
    eventually,
    gateway_env,
    process_environ,
    real_codex_vars,
    rejected_connect,
    start_gateway,
    token_for,
)
from gateway_tests.hostile_archives import (
    GO_FIXTURE,
    PARTIAL,
    add_file,
    add_special,
    add_zeros,
    tar_gz,
)
from gateway_tests.process_trees import descendants
from gateway_tests.real_codex_turns import STEP_TIMEOUT, record_user_message
from gateway_tests.s3_control import BucketView, S3Outage, archive_files, s3_env
from gateway_tests.s3_server import settings_for

# Restore bounds of the daemon in the hostile-archive test.
MAX_RESTORE_BYTES = 1 << 20
MAX_RESTORE_ENTRIES = 20
# A bound for one in-process step (connect, save, restore against loopback S3).
STEP = 20.0


async def start_s3_gateway(
    nursery: trio.Nursery,
    root: Path,
    codex_bin: Path,
    settings: S3Settings,
    **overrides: str,
) -> RunningGateway:
    """An in-process daemon under ``root`` whose store is ``settings``' bucket."""
    return await start_gateway(
        nursery, gateway_env(root, codex_bin, **s3_env(settings), **overrides)
    )


async def fake_pid(rpc: Any) -> int:
    """The pid of the fake codex behind a connection."""
    return int((await rpc.result("fake/pid"))["pid"])


async def listed_threads(rpc: Any) -> set[str]:
    """The thread ids ``thread/list`` shows."""
    return {thread["id"] for thread in (await rpc.result("thread/list", {}))["data"]}


def thread_row(database_path: Path, thread_id: str) -> tuple[Any, ...] | None:
    """The columns of a thread's row in codex's state database that decide its listing."""
    database = sqlite3.connect(f"file:{database_path}?mode=ro", uri=True)
    try:
        row: tuple[Any, ...] | None = database.execute(
            "SELECT has_user_event, first_user_message, archived FROM threads WHERE id = ?",
            (thread_id,),
        ).fetchone()
        return row
    finally:
        database.close()


def holds_thread(bucket: BucketView, workspace_id: str, thread_id: str) -> Callable[[], bool]:
    """A predicate: the stored archive holds a file named after ``thread_id``."""

    def check() -> bool:
        members = bucket.members(workspace_id)
        return members is not None and any(thread_id in name for name in members)

    return check


def saves(kind: str, result: str) -> float:
    """The in-process daemon's ``cxg_saves_total`` for one kind and result."""
    value = REGISTRY.get_sample_value("cxg_saves_total", {"kind": kind, "result": result})
    return value or 0.0


def thread_titles(database_path: Path) -> list[str]:
    """The titles in the Go fixture's ``threads`` table."""
    database = sqlite3.connect(database_path)
    try:
        return [title for (title,) in database.execute("SELECT title FROM threads")]
    finally:
        database.close()


def fake_codex_children() -> list[int]:
    """Fake codex processes started by this (test) process."""
    running = []
    for pid in descendants(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"fake_codex.py" in cmdline:
            running.append(pid)
    return running


# -- 1. SIGKILL of the whole daemon loses at most one checkpoint interval ------------------------


async def test_real_codex_thread_survives_sigkill_of_the_whole_daemon_on_a_new_node(
    nursery: trio.Nursery,
    tmp_path: Path,
    real_codex_bin: Path,
    s3_settings: S3Settings,
    bucket: BucketView,
) -> None:
    text = "remember me after the crash"
    common = await real_codex_vars()
    env = daemon_env(
        tmp_path / "node1",
        real_codex_bin,
        CXG_CHECKPOINT_INTERVAL="1s",
        **common,
        **s3_env(s3_settings),
    )
    with trio.fail_after(STEP_TIMEOUT * 3):
        async with serve_process(env) as (daemon, url), client(url, token_for("ws_kill")) as rpc:
            thread = (await rpc.result("thread/start", {}))["thread"]
            thread_id, rollout = thread["id"], Path(thread["path"])
            await record_user_message(rpc, thread_id, text)

            # codex records the message in the rollout first and marks the thread listable in
            # its state database a moment later; what survives must be both, as the live
            # child shows them once the thread is listed.
            with trio.fail_after(STEP_TIMEOUT):
                while thread_id not in await listed_threads(rpc):  # noqa: ASYNC110 - codex notifies nothing when the thread becomes listable
                    await trio.sleep(0.1)
            live_home = rollout.parents[4]
            listed_row = thread_row(live_home / "state_5.sqlite", thread_id)

            def checkpoint_holds_the_listed_thread() -> bool:
                members = bucket.members("ws_kill") or {}
                in_rollout = any(
                    thread_id in name and text.encode() in data for name, data in members.items()
                )
                database = members.get("state_5.sqlite")
                if not in_rollout or database is None:
                    return False
                copy = tmp_path / "checkpointed_state.sqlite"
                copy.write_bytes(database)
                return thread_row(copy, thread_id) == listed_row

            await eventually(checkpoint_holds_the_listed_thread, within=STEP_TIMEOUT)
            doomed = [daemon.process.pid, *descendants(daemon.process.pid)]
            assert len(doomed) >= 2, "the codex child should be running"
            for pid in doomed:
                os.kill(pid, signal.SIGKILL)
            await daemon.wait_exit()
        assert rollout.exists(), "the dead node's disk is left as it was"

    # The node is lost with its disk; a new daemon starts with the same configuration on an
    # empty CXG_TMP_ROOT: only what the store holds is left.
    shutil.rmtree(tmp_path / "node1")
    fresh = await start_s3_gateway(
        nursery, tmp_path / "node1", real_codex_bin, s3_settings, **common
    )
    try:
        with trio.fail_after(STEP_TIMEOUT * 2):
            async with connect(fresh, "ws_kill") as rpc:
                assert thread_id in await listed_threads(rpc)
                resumed = await rpc.result("thread/resume", {"threadId": thread_id})
                assert resumed["thread"]["id"] == thread_id
                assert text in Path(resumed["thread"]["path"]).read_text()
    finally:
        await fresh.shutdown()


async def test_real_codex_thread_resumes_after_a_restore_under_another_tmp_root(
    nursery: trio.Nursery,
    tmp_path: Path,
    real_codex_bin: Path,
    s3_settings: S3Settings,
) -> None:
    text = "moved to another directory"
    common = await real_codex_vars()
    before = await start_s3_gateway(
        nursery, tmp_path / "before", real_codex_bin, s3_settings, **common
    )
    try:
        with trio.fail_after(STEP_TIMEOUT * 2):
            async with connect(before, "ws_moved") as rpc:
                thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
                await record_user_message(rpc, thread_id, text)
                assert (await before.restart("ws_moved")).status_code == 204
    finally:
        await before.shutdown()

    after = await start_s3_gateway(
        nursery, tmp_path / "after", real_codex_bin, s3_settings, **common
    )
    try:
        with trio.fail_after(STEP_TIMEOUT * 2):
            async with connect(after, "ws_moved") as rpc:
                assert thread_id in await listed_threads(rpc)
                resumed = await rpc.result("thread/resume", {"threadId": thread_id})
                assert text in Path(resumed["thread"]["path"]).read_text()
    finally:
        await after.shutdown()


# -- 2. Clean stop saves, restart restores, unchanged checkpoints upload nothing ----------------


async def test_clean_stop_saves_restart_restores_and_unchanged_checkpoints_upload_nothing(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_codex_bin: Path,
    s3_settings: S3Settings,
    bucket: BucketView,
) -> None:
    gateway = await start_s3_gateway(
        nursery, tmp_path, fake_codex_bin, s3_settings, CXG_CHECKPOINT_INTERVAL="1s"
    )
    home = tmp_path / "sessions" / "ws_clean"
    try:
        with trio.fail_after(STEP):
            async with connect(gateway, "ws_clean") as rpc:
                thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
                assert (await gateway.restart("ws_clean")).status_code == 204
                assert (await rpc.closed()).code == 1012
        assert holds_thread(bucket, "ws_clean", thread_id)()
        assert not home.exists()

        uploaded = saves("checkpoint", "ok")
        with trio.fail_after(STEP):
            async with connect(gateway, "ws_clean") as rpc:
                assert thread_id in await listed_threads(rpc)
                # Starting the child touched the home (config.toml, the child's own files):
                # the first checkpoint uploads that once.
                await eventually(lambda: saves("checkpoint", "ok") > uploaded)
                saved, uploads = bucket.state("ws_clean"), bucket.versions("ws_clean")

                # Then two checkpoints of the unchanged home run; neither uploads anything.
                unchanged = saves("checkpoint", "unchanged")
                await eventually(lambda: saves("checkpoint", "unchanged") >= unchanged + 2)
                entry = await gateway.session("ws_clean")
                assert entry is not None and entry["lastSaveError"] is None
                assert entry["lastCheckpointAt"] is not None
                assert bucket.versions("ws_clean") == uploads
                assert bucket.state("ws_clean") == saved

                # A change is uploaded by the next checkpoint, while the session runs.
                second = (await rpc.result("thread/start", {}))["thread"]["id"]
                await eventually(holds_thread(bucket, "ws_clean", second))
                assert bucket.versions("ws_clean") == uploads + 1
    finally:
        await gateway.shutdown()


# -- 3. S3 down at save: the home is kept, retried, and saved when S3 is back ------------------


async def test_store_down_at_stop_keeps_the_home_and_the_retry_saves_it_once_s3_is_back(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_codex_bin: Path,
    bucket: BucketView,
    outage: S3Outage,
) -> None:
    gateway = await start_s3_gateway(
        nursery,
        tmp_path,
        fake_codex_bin,
        settings_for(outage.endpoint, bucket.bucket),
        CXG_CHILD_STOP_GRACE="2s",
        CXG_DRAIN_BUDGET="2s",
    )
    home = tmp_path / "sessions" / "ws_outage" / "codex-home"
    failed = saves("final", "failed")
    try:
        with trio.fail_after(STEP):
            async with connect(gateway, "ws_outage") as rpc:
                thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
                outage.take_down()
                response = await gateway.restart("ws_outage")
                assert response.status_code == 500
                assert "not saved" in response.text
                assert (await rpc.closed()).code == 1012

        # The stopped session's home is kept on disk, and the failure is visible.
        assert list(home.glob(f"sessions/*/*/*/rollout-*-{thread_id}.jsonl"))
        entry = await gateway.session("ws_outage")
        assert entry is not None
        assert entry["state"] == "saving"
        assert archive_key("ws_outage") in entry["lastSaveError"]
        assert saves("final", "failed") > failed
        assert not bucket.exists("ws_outage")

        outage.bring_back()
        await eventually(holds_thread(bucket, "ws_outage", thread_id), within=STEP * 2)
        await eventually(lambda: not home.parent.exists())
        assert await gateway.session("ws_outage") is None
        with trio.fail_after(STEP):
            async with connect(gateway, "ws_outage") as rpc:
                assert thread_id in await listed_threads(rpc)
    finally:
        outage.bring_back()
        await gateway.shutdown()


async def test_reconnect_during_the_first_final_save_waits_for_it_and_restores_what_it_saved(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_codex_bin: Path,
    bucket: BucketView,
    outage: S3Outage,
) -> None:
    # An earlier checkpoint failed (S3 was down); the final save's first attempt is slow.
    gateway = await start_s3_gateway(
        nursery,
        tmp_path,
        fake_codex_bin,
        settings_for(outage.endpoint, bucket.bucket),
        CXG_CHECKPOINT_INTERVAL="1s",
        CXG_CHILD_STOP_GRACE="2s",
    )
    checkpoint_failed = saves("checkpoint", "failed")
    final_ok, final_failed = saves("final", "ok"), saves("final", "failed")
    restarted: list[int] = []

    async def restart() -> None:
        restarted.append((await gateway.restart("ws_slow")).status_code)

    try:
        with structlog.testing.capture_logs() as logs, trio.fail_after(STEP * 2):
            async with connect(gateway, "ws_slow") as rpc:
                thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
                outage.take_down()
                await eventually(lambda: saves("checkpoint", "failed") > checkpoint_failed)
                entry = await gateway.session("ws_slow")
                assert entry is not None and entry["lastSaveError"] is not None
                outage.hold()
                outage.bring_back()
                nursery.start_soon(restart)
                assert (await rpc.closed()).code == 1012
            # The final save is under way (and cannot finish while S3 is held).
            await eventually(lambda: any(e["event"] == "session.final_save" for e in logs))
            entry = await gateway.session("ws_slow")
            assert entry is not None and entry["state"] == "saving"

            # A reconnect while that first attempt is under way waits for it.
            async with trio.open_nursery() as clients:
                listed: list[set[str]] = []

                async def reconnect() -> None:
                    async with connect(gateway, "ws_slow") as again:
                        listed.append(await listed_threads(again))

                clients.start_soon(reconnect)
                await eventually(
                    lambda: any(e["event"] == "session.waiting_for_previous" for e in logs)
                )
                outage.release()
            await eventually(lambda: restarted != [])

        assert restarted == [204]
        assert saves("final", "ok") == final_ok + 1
        assert saves("final", "failed") == final_failed
        assert holds_thread(bucket, "ws_slow", thread_id)()
        # The new session restored the saved snapshot; it adopted nothing.
        assert listed == [{thread_id}]
        assert not any(e["event"] == "session.adopting_unsaved_home" for e in logs)
    finally:
        outage.release()
        outage.bring_back()
        await gateway.shutdown()


# -- 4. S3 down at start: 503 with a reason, nothing started on an empty home ------------------


async def test_store_down_at_start_refuses_with_503_and_starts_no_child(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_codex_bin: Path,
    bucket: BucketView,
    outage: S3Outage,
) -> None:
    gateway = await start_s3_gateway(
        nursery, tmp_path, fake_codex_bin, settings_for(outage.endpoint, bucket.bucket)
    )
    try:
        outage.take_down()
        rejected = await rejected_connect(gateway.ws_url, bearer(token_for("ws_down")), within=STEP)
        assert rejected.status_code == 503
        body = (rejected.body or b"").decode()
        # A fixed sentence and a request id; the store's details are in the log only.
        assert body.startswith("session could not start; retry shortly (request id ")
        assert "127.0.0.1" not in body and "s3://" not in body

        assert fake_codex_children() == []
        assert not (tmp_path / "sessions" / "ws_down").exists()
        assert await gateway.sessions() == []

        # The daemon goes on serving; once S3 is back the same workspace starts normally.
        outage.bring_back()
        with trio.fail_after(STEP):
            async with connect(gateway, "ws_down") as rpc:
                await rpc.result("thread/start", {})
    finally:
        outage.bring_back()
        await gateway.shutdown()


# -- 5. Hostile archives are refused and left untouched ----------------------------------------


def _traversal(archive: tarfile.TarFile) -> None:
    add_file(archive, "ok")
    add_file(archive, "sessions/../../escape")


def _bomb(archive: tarfile.TarFile) -> None:
    # Each entry is within the bound; together they expand to 8 times the total.
    for index in range(16):
        add_zeros(archive, f"zeros{index}", MAX_RESTORE_BYTES // 2)


def _many(archive: tarfile.TarFile) -> None:
    for index in range(MAX_RESTORE_ENTRIES + 1):
        add_file(archive, f"f{index}")


def hostile_archives() -> dict[str, bytes]:
    """One archive per attack, against the daemon's restore bounds."""
    bomb = tar_gz(_bomb)
    assert len(bomb) < 64 * 1024, "a gzip bomb is small when stored"
    return {
        "traversal": tar_gz(_traversal),
        "absolute": tar_gz(lambda a: add_file(a, "/tmp/cxg-absolute-escape")),
        "symlink_named_out": tar_gz(lambda a: add_special(a, "../link", tarfile.SYMTYPE, "x")),
        "hardlink_out": tar_gz(lambda a: add_special(a, "hard", tarfile.LNKTYPE, "/etc/passwd")),
        "device_named_out": tar_gz(lambda a: add_special(a, "/tmp/dev", tarfile.CHRTYPE)),
        "oversize_entry": tar_gz(lambda a: add_file(a, "big", os.urandom(MAX_RESTORE_BYTES + 1))),
        "gzip_bomb": bomb,
        "too_many_entries": tar_gz(_many),
        **{name.replace("-", "_"): data for name, data in PARTIAL.items()},
    }


async def test_hostile_archives_are_refused_untouched_and_other_workspaces_go_on(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_codex_bin: Path,
    s3_settings: S3Settings,
    bucket: BucketView,
) -> None:
    gateway = await start_s3_gateway(
        nursery,
        tmp_path,
        fake_codex_bin,
        s3_settings,
        CXG_RESTORE_MAX_BYTES=str(MAX_RESTORE_BYTES),
        CXG_RESTORE_MAX_ENTRIES=str(MAX_RESTORE_ENTRIES),
    )
    sessions = tmp_path / "sessions"
    try:
        with trio.fail_after(STEP * 2):
            async with connect(gateway, "ws_neighbour") as neighbour:
                thread_id = (await neighbour.result("thread/start", {}))["thread"]["id"]
                for attack, body in hostile_archives().items():
                    workspace_id = f"ws_{attack}"
                    stored = bucket.put(workspace_id, body)
                    token = bearer(token_for(workspace_id))
                    rejected = await rejected_connect(gateway.ws_url, token)
                    assert rejected.status_code == 500, attack
                    reason = (rejected.body or b"").decode()
                    assert archive_key(workspace_id) in reason, (attack, reason)
                    assert "untouched" in reason, (attack, reason)
                    assert bucket.state(workspace_id) == stored, attack
                    assert bucket.versions(workspace_id) == 1, attack
                    assert not (sessions / workspace_id).exists(), attack
                    # Every reconnect gets the same refusal (remembered, not read again; a
                    # refusal is not a crash, so no back-off hides it), and nothing ever saves
                    # over the object.
                    for _ in range(3):
                        again = await rejected_connect(gateway.ws_url, token)
                        assert again.status_code == 500, attack
                        # The same sentence; each refusal has its own request id.
                        again_reason = (again.body or b"").decode()
                        assert (
                            again_reason.split(" (request id ")[0]
                            == (reason.split(" (request id ")[0])
                        ), attack
                    assert bucket.state(workspace_id) == stored, attack
                    assert bucket.versions(workspace_id) == 1, attack
                assert not Path("/tmp/cxg-absolute-escape").exists()
                assert not (sessions.parent / "escape").exists()
                assert {entry["workspaceId"] for entry in await gateway.sessions()} == {
                    "ws_neighbour"
                }
                # The workspace that was running all along is unaffected.
                assert thread_id in await listed_threads(neighbour)
    finally:
        await gateway.shutdown()


# -- 6. A stale writer's save is rejected and the newer snapshot survives ----------------------


async def test_stale_writer_checkpoint_is_rejected_its_clients_get_1012_and_newer_snapshot_survives(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_codex_bin: Path,
    s3_settings: S3Settings,
    bucket: BucketView,
) -> None:
    # Two pods of the same bucket; the first keeps running when the second takes over.
    first = await start_s3_gateway(
        nursery, tmp_path / "a", fake_codex_bin, s3_settings, CXG_CHECKPOINT_INTERVAL="1s"
    )
    second = await start_s3_gateway(nursery, tmp_path / "b", fake_codex_bin, s3_settings)
    stale = saves("checkpoint", "stale")
    try:
        with structlog.testing.capture_logs() as logs, trio.fail_after(STEP * 2):
            async with connect(first, "ws_twice") as old:
                older_thread = (await old.result("thread/start", {}))["thread"]["id"]
                await eventually(holds_thread(bucket, "ws_twice", older_thread))

                async with connect(second, "ws_twice") as new:
                    assert older_thread in await listed_threads(new)
                    newer_thread = (await new.result("thread/start", {}))["thread"]["id"]
                    assert (await second.restart("ws_twice")).status_code == 204
                newer = bucket.state("ws_twice")
                assert newer is not None
                uploads = bucket.versions("ws_twice")

                # The first pod's home changes; its next checkpoint is a stale write.
                lost_thread = (await old.result("thread/start", {}))["thread"]["id"]
                closed = await old.closed(within=STEP)
                assert closed.code == 1012
                assert "newer snapshot" in (closed.reason or "")

            orphaned = tmp_path / "a" / "sessions" / ".orphaned"
            await eventually(lambda: orphaned.exists() and any(orphaned.iterdir()))
        assert saves("checkpoint", "stale") == stale + 1
        assert any(entry["event"] == "session.superseded" for entry in logs)

        # The newer snapshot survives, byte for byte.
        assert bucket.state("ws_twice") == newer
        assert bucket.versions("ws_twice") == uploads
        members = archive_files(newer.body)
        assert any(newer_thread in name for name in members)
        assert not any(lost_thread in name for name in members)

        # The stale home is set aside for an operator, never deleted nor uploaded.
        (aside,) = orphaned.iterdir()
        assert aside.name.startswith("ws_twice-")
        assert list(aside.glob(f"codex-home/sessions/*/*/*/rollout-*-{lost_thread}.jsonl"))
        assert not (tmp_path / "a" / "sessions" / "ws_twice").exists()
        assert await first.session("ws_twice") is None

        # The first pod's next session of the workspace starts from the newer snapshot.
        async with connect(first, "ws_twice") as rpc:
            assert {older_thread, newer_thread} <= await listed_threads(rpc)
    finally:
        await first.shutdown()
        await second.shutdown()


# -- 7. An archive written by the Go service restores --------------------------------------------


async def test_go_service_archive_restores_and_is_saved_back_over_its_generation(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_codex_bin: Path,
    s3_settings: S3Settings,
    bucket: BucketView,
) -> None:
    go_files = archive_files(GO_FIXTURE.read_bytes())
    go_object = bucket.put("ws_go", GO_FIXTURE.read_bytes())
    gateway = await start_s3_gateway(nursery, tmp_path, fake_codex_bin, s3_settings)
    try:
        with trio.fail_after(STEP):
            async with connect(gateway, "ws_go") as rpc:
                home = Path(process_environ(await fake_pid(rpc))["CODEX_HOME"])
                for name, data in go_files.items():
                    if name != "config.toml":  # rendered over by the gateway at every start
                        assert (home / name).read_bytes() == data, name
                        # Only the owner's bits survive (the Go script's 0755 keeps its x).
                        mode = 0o700 if name.endswith(".sh") else 0o600
                        assert (home / name).stat().st_mode & 0o777 == mode, name
                assert thread_titles(home / "state_5.sqlite") == ["from the Go gateway"]
                assert (await gateway.restart("ws_go")).status_code == 204

        # Saved back as a new generation over the Go service's object, with the Go files in.
        saved = bucket.state("ws_go")
        assert saved is not None and saved.etag != go_object.etag
        members = archive_files(saved.body)
        for name, data in go_files.items():
            if name not in ("config.toml", "state_5.sqlite"):
                assert members[name] == data, name
        # The database is copied through the SQLite backup API: same content, new bytes.
        copy = tmp_path / "saved.sqlite"
        copy.write_bytes(members["state_5.sqlite"])
        assert thread_titles(copy) == ["from the Go gateway"]
    finally:
        await gateway.shutdown()


async def test_stale_writer_final_save_at_stop_is_rejected_and_the_home_set_aside(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_codex_bin: Path,
    s3_settings: S3Settings,
    bucket: BucketView,
) -> None:
    # Both pods start the workspace from nothing; the second saves first.
    first = await start_s3_gateway(nursery, tmp_path / "a", fake_codex_bin, s3_settings)
    second = await start_s3_gateway(nursery, tmp_path / "b", fake_codex_bin, s3_settings)
    stale = saves("final", "stale")
    try:
        with structlog.testing.capture_logs() as logs, trio.fail_after(STEP * 2):
            async with connect(first, "ws_race") as old, connect(second, "ws_race") as new:
                lost_thread = (await old.result("thread/start", {}))["thread"]["id"]
                newer_thread = (await new.result("thread/start", {}))["thread"]["id"]
                assert (await second.restart("ws_race")).status_code == 204
                newer = bucket.state("ws_race")
                assert newer is not None

                # The first pod's stop: its final save is fenced off, and not retried.
                response = await first.restart("ws_race")
                assert response.status_code == 409
                assert "newer snapshot" in response.text
                assert (await old.closed()).code == 1012
        assert saves("final", "stale") == stale + 1
        assert any(entry["event"] == "session.superseded" for entry in logs)
        assert bucket.state("ws_race") == newer
        assert bucket.versions("ws_race") == 1
        members = archive_files(newer.body)
        assert any(newer_thread in name for name in members)
        assert not any(lost_thread in name for name in members)
        (aside,) = (tmp_path / "a" / "sessions" / ".orphaned").iterdir()
        assert list(aside.glob(f"codex-home/sessions/*/*/*/rollout-*-{lost_thread}.jsonl"))
        assert not (tmp_path / "a" / "sessions" / "ws_race").exists()
        assert await first.session("ws_race") is None
    finally:
        await first.shutdown()
        await second.shutdown()


# -- 8. A black-holed S3: the connect gets 503 before the client gives up ----------------------


async def _black_hole(*, task_status: trio.TaskStatus[str]) -> None:
    """A loopback listener that accepts every connection, reads it, and never answers."""

    async def swallow(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some(65536):
                pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        task_status.started(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        await trio.serve_listeners(swallow, listeners, handler_nursery=nursery)


# The codex client gives up on a connect after about 10 s.
CLIENT_CONNECT_WAIT = 10.0


async def test_black_holed_s3_gives_the_connect_503_within_the_clients_wait(
    nursery: trio.Nursery, tmp_path: Path, fake_codex_bin: Path
) -> None:
    endpoint: str = await nursery.start(_black_hole)
    # The default CXG_S3_TIMEOUT: the test is about the value operators get.
    gateway = await start_s3_gateway(nursery, tmp_path, fake_codex_bin, settings_for(endpoint))
    try:
        with structlog.testing.capture_logs() as logs:
            started = trio.current_time()
            refused = await rejected_connect(
                gateway.ws_url, bearer(token_for("ws_black_hole")), within=CLIENT_CONNECT_WAIT
            )
            waited = trio.current_time() - started
            # The failure is in the log by the time the client has its answer.
            # The detail is logged once, by the connect, under the client's request id.
            failures = [entry for entry in logs if entry["event"] == "connect.session_start_failed"]
        assert refused.status_code == 503
        assert len(failures) == 1
        assert "no answer within 5 s (CXG_S3_TIMEOUT)" in failures[0]["error"]
        assert 4.5 <= waited < CLIENT_CONNECT_WAIT
        assert fake_codex_children() == []
    finally:
        await gateway.shutdown()


# -- 9. With the real codex: what a restore must keep ------------------------------------------


async def _threads_with_messages(rpc: Any, texts: list[str]) -> list[dict[str, Any]]:
    """One thread per text, each with that user message recorded in its rollout."""
    threads = []
    for text in texts:
        thread = (await rpc.result("thread/start", {}))["thread"]
        await record_user_message(rpc, thread["id"], text)
        threads.append(thread)
    return threads


async def _listed_by_update(rpc: Any) -> list[tuple[str, int]]:
    """``thread/list`` sorted by ``updated_at``: (id, updatedAt) in the order codex gives."""
    listed = (await rpc.result("thread/list", {"sortKey": "updated_at"}))["data"]
    return [(thread["id"], thread["updatedAt"]) for thread in listed]


async def test_real_codex_thread_order_and_update_times_survive_save_and_restore(
    nursery: trio.Nursery,
    tmp_path: Path,
    real_codex_bin: Path,
    s3_settings: S3Settings,
) -> None:
    common = await real_codex_vars()
    gateway = await start_s3_gateway(
        nursery, tmp_path / "node", real_codex_bin, s3_settings, **common
    )
    try:
        with trio.fail_after(STEP_TIMEOUT * 3):
            async with connect(gateway, "ws_times") as rpc:
                threads = await _threads_with_messages(rpc, ["oldest", "middle", "newest"])
                # codex 0.169.0 takes a thread's updatedAt from its rollout file's mtime. Threads
                # last used days apart (not seconds apart, as a test makes them) show the order.
                for age_days, thread in zip((30, 7, 1), threads, strict=True):
                    when = 1_790_000_000 - age_days * 86400
                    os.utime(thread["path"], (when, when))
                before = await _listed_by_update(rpc)
                assert [thread_id for thread_id, _ in before] == [t["id"] for t in threads[::-1]]
                assert (await gateway.restart("ws_times")).status_code == 204

            async with connect(gateway, "ws_times") as rpc:
                assert await _listed_by_update(rpc) == before
    finally:
        await gateway.shutdown()


def go_shaped(saved: bytes, extra: Callable[[tarfile.TarFile], None]) -> bytes:
    """``saved`` re-encoded the way the Go service writes an archive, plus ``extra`` entries.

    USTAR headers (Go's ``tar.FileInfoHeader``: the directory bit in directory modes, the
    owner's uid), names relative to the home, two zero blocks and no record padding at the end
    (Go's ``archive/tar``), gzip with ``compress/gzip`` defaults (no name, mtime 0).
    """
    raw = bytearray()
    with tarfile.open(fileobj=io.BytesIO(saved), mode="r:gz") as source:
        members = [(m, source.extractfile(m)) for m in source.getmembers()]
        for member, body in members:
            member.uid = member.gid = 1000
            member.uname = member.gname = ""
            if member.isdir():
                member.mode |= 0o40000
            raw += member.tobuf(tarfile.USTAR_FORMAT)
            if body is not None:
                data = body.read()
                raw += data + bytes(-len(data) % tarfile.BLOCKSIZE)
    scratch = io.BytesIO()
    with tarfile.open(fileobj=scratch, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        extra(archive)
    # The extra entries' blocks without Python's end marker and record padding.
    tail = scratch.getvalue().rstrip(b"\0")
    raw += tail + bytes(-len(tail) % tarfile.BLOCKSIZE)
    raw += bytes(2 * tarfile.BLOCKSIZE)
    return gzip.compress(bytes(raw), mtime=0)


def _uncleanly_stopped_leftovers(archive: tarfile.TarFile) -> None:
    # What codex leaves when its child died uncleanly: helper links under tmp/arg0-linux/.
    for name in ("tmp", "tmp/arg0-linux", "tmp/arg0-linux/codex-arg0abc"):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o40755, 1767312000
        archive.addfile(info)
    link = tarfile.TarInfo("tmp/arg0-linux/codex-arg0abc/apply_patch")
    link.type, link.linkname, link.mode = tarfile.SYMTYPE, "/usr/local/bin/codex", 0o777
    archive.addfile(link)
    fifo = tarfile.TarInfo("tmp/arg0-linux/codex-arg0abc/.lock-pipe")
    fifo.type, fifo.mode = tarfile.FIFOTYPE, 0o600
    archive.addfile(fifo)


async def test_real_codex_resumes_a_go_shaped_archive_with_a_symlink_and_a_fifo(
    nursery: trio.Nursery,
    tmp_path: Path,
    real_codex_bin: Path,
    s3_settings: S3Settings,
    bucket: BucketView,
) -> None:
    text = "written before the Go pod died"
    common = await real_codex_vars()
    gateway = await start_s3_gateway(
        nursery, tmp_path / "node", real_codex_bin, s3_settings, **common
    )
    try:
        with trio.fail_after(STEP_TIMEOUT * 3):
            async with connect(gateway, "ws_from_go") as rpc:
                (thread,) = await _threads_with_messages(rpc, [text])
                assert (await gateway.restart("ws_from_go")).status_code == 204
            saved = bucket.state("ws_from_go")
            assert saved is not None
            # The Go service uploaded this home, leftovers and all.
            bucket.put("ws_from_go", go_shaped(saved.body, _uncleanly_stopped_leftovers))
            leftovers = tmp_path / "node/sessions/ws_from_go/codex-home/tmp/arg0-linux"

            with structlog.testing.capture_logs() as logs:
                async with connect(gateway, "ws_from_go") as rpc:
                    # Never created: not the link, not the fifo (their directories are kept).
                    assert (leftovers / "codex-arg0abc").is_dir()
                    assert os.listdir(leftovers / "codex-arg0abc") == []
                    assert thread["id"] in await listed_threads(rpc)
                    resumed = await rpc.result("thread/resume", {"threadId": thread["id"]})
                    assert text in Path(resumed["thread"]["path"]).read_text()
            skipped = [entry for entry in logs if entry["event"] == "restore.entries_skipped"]
            assert len(skipped) == 1
            assert (skipped[0]["symlinks"], skipped[0]["fifos_and_devices"]) == (1, 1)
    finally:
        await gateway.shutdown()
