"""Children die with the daemon; the next start ends what is left under its session root.

The daemon is a real ``python -m gateway serve`` process, SIGKILLed by the test. Only processes
these tests created are looked at (by pid and start time).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import trio

from gateway.sessions.process_tree import children_of, read_stat
from gateway_tests.daemon_process import client, daemon_env, serve_process
from gateway_tests.harness import admin_restart, eventually, token_for
from gateway_tests.process_trees import GRANDCHILDREN, is_running, make_tree_launcher, read_pids

STEP_TIMEOUT = 30.0


async def test_a_sigkilled_daemon_takes_its_child_along_and_the_next_start_ends_the_rest(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "tree-pids"
    launcher = make_tree_launcher(tmp_path / "bin", pid_file)
    env = daemon_env(tmp_path, launcher)
    with trio.fail_after(STEP_TIMEOUT * 3):
        async with serve_process(env) as (daemon, url), client(url, token_for("ws_dead")) as rpc:
            child = int((await rpc.result("fake/pid"))["pid"])
            child_stat = read_stat(child)
            assert child_stat is not None and child_stat.ppid == daemon.process.pid
            await eventually(lambda: len(read_pids(pid_file)) == len(GRANDCHILDREN))
            grandchildren = read_pids(pid_file)
            daemon.process.kill()
            await daemon.wait_exit()
            # The parent-death signal: the child does not outlive the daemon.
            await eventually(lambda: not is_running(child, child_stat.start_time))
        # The grandchildren were the child's, not the daemon's: they are still there, in the
        # directory the next start is about to set aside.
        left = {name for name, (pid, start) in grandchildren.items() if is_running(pid, start)}
        assert left == set(GRANDCHILDREN)

        async with serve_process(env) as (restarted, _url):
            events = [r.get("event") for r in restarted.records]
            ended = [
                r for r in restarted.records if r.get("event") == "session.leftover_process_ended"
            ]
            assert {r["pid"] for r in ended} == {pid for pid, _ in grandchildren.values()}
            assert all(r["path"].startswith(str(tmp_path / "sessions")) for r in ended)
            # Ended before the daemon served anything (and so before any set-aside).
            last_ended = len(events) - 1 - events[::-1].index("session.leftover_process_ended")
            assert last_ended < events.index("daemon.serving")
            for pid, start in grandchildren.values():
                assert not is_running(pid, start)


async def test_the_next_start_ends_a_process_planted_under_the_session_root(
    tmp_path: Path, fake_codex_bin: Path
) -> None:
    workdir = tmp_path / "sessions" / "ws_planted" / "home"
    workdir.mkdir(parents=True)
    # Not a child of the daemon: the test's own, working inside a session directory.
    planted = await trio.lowlevel.open_process(
        ["sleep", "1000"], cwd=str(workdir), stdin=subprocess.DEVNULL
    )
    outside = await trio.lowlevel.open_process(
        ["sleep", "1000"], cwd=str(tmp_path), stdin=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(STEP_TIMEOUT * 2):
            async with serve_process(daemon_env(tmp_path, fake_codex_bin)) as (daemon, _url):
                record = await daemon.wait_for_log(
                    "session.leftover_process_ended", pid=planted.pid
                )
                assert record["matched"] == "cwd" and record["name"] == "sleep"
                assert await planted.wait() == -signal.SIGKILL
                # A process outside the session root is none of the daemon's business.
                assert outside.returncode is None and is_running(
                    outside.pid,
                    read_stat(outside.pid).start_time,  # type: ignore[union-attr]
                )
    finally:
        for process in (planted, outside):
            if process.returncode is None:
                os.kill(process.pid, signal.SIGKILL)
                await process.wait()


async def test_a_stopped_session_leaves_no_process_or_zombie_below_the_daemon(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "tree-pids"
    launcher = make_tree_launcher(tmp_path / "bin", pid_file)
    with trio.fail_after(STEP_TIMEOUT * 2):
        async with serve_process(daemon_env(tmp_path, launcher)) as (daemon, url):
            # The start-up checks run `codex --version` as a child of their own: let them end.
            await daemon.wait_for_log("startup.checks_passed")
            async with client(url, token_for("ws_reaped")) as rpc:
                child = int((await rpc.result("fake/pid"))["pid"])
                await eventually(lambda: len(read_pids(pid_file)) == len(GRANDCHILDREN))
                grandchildren = read_pids(pid_file)
                assert children_of(daemon.process.pid) == [child]
                response = await admin_restart(url, "ws_reaped")
                assert response.status_code == 204
            # The child was reaped by the daemon; nothing of the session is left below it,
            # not even a zombie, and none of the grandchildren runs anywhere.
            assert children_of(daemon.process.pid) == []
            assert not any(is_running(pid, start) for pid, start in grandchildren.values())
