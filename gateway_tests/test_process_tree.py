"""A session's whole process tree ends with it (issue 11), and its child's last words are kept.

The child is the fake codex started through a launcher that leaves grandchildren behind: one
ignoring SIGTERM, one in its own session, one orphaned by a double fork. Only processes these
tests created are looked at, by pid and start time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import structlog

from gateway.sessions.child_process import child_preexec, start_child_process
from gateway.sessions.process_tree import read_stat
from gateway_tests.harness import LaunchGateway, connect, eventually
from gateway_tests.process_trees import (
    GRANDCHILDREN,
    is_running,
    make_tree_launcher,
    read_pids,
)


async def _child_pid(rpc) -> int:  # type: ignore[no-untyped-def]
    return int((await rpc.result("fake/pid"))["pid"])


async def test_stopping_a_session_ends_every_process_of_its_tree(
    launch_gateway: LaunchGateway, tmp_path: Path
) -> None:
    pid_file = tmp_path / "tree-pids"
    launcher = make_tree_launcher(tmp_path / "bin", pid_file)
    gateway = await launch_gateway(launcher, CXG_CHILD_STOP_GRACE="2s")
    async with connect(gateway, "ws_tree") as rpc:
        child = await _child_pid(rpc)
        await eventually(lambda: len(read_pids(pid_file)) == len(GRANDCHILDREN))
        grandchildren = read_pids(pid_file)
        stats = {name: read_stat(pid) for name, (pid, _) in grandchildren.items()}
        # The shapes this test is about: one left the group, the orphan was adopted by the
        # child (a subreaper) rather than by init.
        assert stats["ignores_term"] is not None and stats["ignores_term"].pgid == child
        assert stats["own_session"] is not None and stats["own_session"].sid != child
        assert stats["orphan"] is not None and stats["orphan"].ppid == child
        assert stats["orphan"].sid != child
        response = await gateway.restart("ws_tree")
        assert response.status_code == 204
    survivors = [n for n, (pid, start) in grandchildren.items() if is_running(pid, start)]
    assert survivors == []
    assert read_stat(child) is None or not read_stat(child).alive  # type: ignore[union-attr]


async def test_a_crashed_child_leaves_no_process_of_its_session_behind(
    launch_gateway: LaunchGateway, tmp_path: Path
) -> None:
    pid_file = tmp_path / "tree-pids"
    launcher = make_tree_launcher(tmp_path / "bin", pid_file)
    gateway = await launch_gateway(launcher)
    async with connect(gateway, "ws_crash_tree") as rpc:
        child = await _child_pid(rpc)
        await eventually(lambda: len(read_pids(pid_file)) == len(GRANDCHILDREN))
        grandchildren = read_pids(pid_file)
        # The child dies at once: its tree is no longer below it when the session stops.
        os.kill(child, signal.SIGKILL)
        assert (await rpc.closed(within=5)).code == 1011
    await eventually(
        lambda: not any(is_running(pid, start) for pid, start in grandchildren.values())
    )


async def test_the_child_is_forked_by_the_event_loop_thread() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits; Trio's worker threads exit when
    # idle, so the fork must come from the thread running the loop.
    process = start_child_process(["sleep", "1000"], stdin=subprocess.DEVNULL)
    try:
        task = Path(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/children")
        assert str(process.pid) in task.read_text().split()
    finally:
        process.kill()
        assert await process.wait() == -signal.SIGKILL


def test_a_child_whose_parent_died_before_the_prctl_ends_itself(tmp_path: Path) -> None:
    # The parent it expects is not its parent (as when the daemon died between fork and
    # prctl): it kills itself before running anything.
    marker = tmp_path / "ran"
    orphaned = subprocess.Popen(
        ["touch", str(marker)], preexec_fn=child_preexec(parent_pid=os.getpid() + 1_000_000)
    )
    assert orphaned.wait(timeout=10) == -signal.SIGKILL
    assert not marker.exists()


@pytest.mark.parametrize("ending", ["child_exits", "session_restarted"])
async def test_the_last_words_of_a_dying_child_reach_the_log(
    launch_gateway: LaunchGateway, tmp_path: Path, ending: str
) -> None:
    last_words = "thread 'main' panicked at app-server/src/lib.rs:1:1: last words of the child"
    launcher = make_tree_launcher(tmp_path / "bin", tmp_path / "tree-pids", last_words=last_words)
    gateway = await launch_gateway(launcher)
    with structlog.testing.capture_logs() as logs:
        async with connect(gateway, "ws_last_words") as rpc:
            fake = await _child_pid(rpc)
            if ending == "child_exits":
                # The fake ends; the launcher (the gateway's child) floods stderr, exits 101.
                os.kill(fake, signal.SIGKILL)
                assert (await rpc.closed(within=10)).code == 1011
            else:
                # The stop's SIGTERM ends the fake; the launcher writes while being stopped.
                assert (await gateway.restart("ws_last_words")).status_code == 204
        await eventually(lambda: any(e.get("event") == "session.stopped" for e in logs), within=20)
    lines = [e["line"] for e in logs if e.get("event") == "child.output"]
    assert lines[-1] == last_words
    assert sum(1 for line in lines if line.startswith("noise line")) == 20000
    stopped = [e for e in logs if e.get("event") == "child.stopped"]
    assert [e["status"] for e in stopped] == [101]
