"""``SessionManager.fence_all``: every session stopped at once, unsaved, its home kept.

Replica mode fences a pod that can no longer be sure it owns its workspaces (heartbeat not
renewed, or its keeper fired). The daemon here is the real one with the fake codex started by a
launcher that leaves grandchildren behind (one ignores SIGTERM, two left the child's session),
so "no process survives" covers a whole tree, not just the child.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import structlog
import trio

from gateway.sessions.manager import SessionManager
from gateway.sessions.outcome import StopReason
from gateway.sessions.process_tree import read_stat
from gateway_tests.fakes.launchers import FAKE_CODEX_SCRIPT, fake_codex_python
from gateway_tests.harness import (
    bearer,
    connect,
    eventually,
    gateway_env,
    rejected_connect,
    start_gateway,
    token_for,
)
from gateway_tests.process_trees import is_running, make_tree_launcher

WORKSPACES = ("ws_fence_a", "ws_fence_b")
# Far longer than the test waits: a fenced child must never be given its SIGTERM grace.
STOP_GRACE = "60s"


def recorded_managers(monkeypatch: pytest.MonkeyPatch) -> list[SessionManager]:
    """Every ``SessionManager`` the daemon creates in this test (our own seam, not a fake)."""
    created: list[SessionManager] = []

    class Recorded(SessionManager):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            created.append(self)

    monkeypatch.setattr("gateway.daemon.SessionManager", Recorded)
    return created


def tree_processes(pid_file: Path) -> list[tuple[int, int]]:
    """(pid, start time) of every grandchild the launchers wrote down."""
    found = []
    for line in pid_file.read_text().splitlines():
        stat = read_stat(int(line.split()[1]))
        if stat is not None:
            found.append((stat.pid, stat.start_time))
    return found


async def test_fence_all_kills_every_process_closes_clients_with_1012_and_saves_nothing(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    managers = recorded_managers(monkeypatch)
    pid_file = tmp_path / "tree-pids"
    launcher = make_tree_launcher(tmp_path / "bin", pid_file)
    gateway = await start_gateway(
        nursery, gateway_env(tmp_path, launcher, CXG_CHILD_STOP_GRACE=STOP_GRACE)
    )
    [manager] = managers
    orphaned = Path(gateway.config.tmp_root) / ".orphaned"
    try:
        with structlog.testing.capture_logs() as logs:
            async with (
                connect(gateway, WORKSPACES[0]) as first,
                connect(gateway, WORKSPACES[1]) as second,
            ):
                for rpc in (first, second):
                    await rpc.result("thread/start", {})
                processes = []
                for workspace_id in WORKSPACES:
                    entry = await gateway.session(workspace_id)
                    assert entry is not None
                    stat = read_stat(entry["pid"])
                    assert stat is not None
                    processes.append((stat.pid, stat.start_time))
                # Three grandchildren per session, each written down by its launcher.
                await eventually(lambda: len(pid_file.read_text().splitlines()) == 6)
                processes += tree_processes(pid_file)
                assert len(processes) == 8 and all(is_running(*p) for p in processes)

                fenced_at = trio.current_time()
                manager.fence_all("test: the heartbeat was not renewed")
                for rpc in (first, second):
                    closed = await rpc.closed(within=2)
                    assert (closed.code, closed.reason) == (
                        StopReason.FENCED.close_code,
                        StopReason.FENCED.close_reason,
                    )
            await eventually(
                lambda: len([e for e in logs if e["event"] == "session.stopped_fenced"]) == 2,
                within=15,
            )
            # Well inside the 60 s grace: nobody was asked to stop, everything was killed.
            assert trio.current_time() - fenced_at < 15
            await eventually(lambda: not any(is_running(*p) for p in processes), within=10)
            assert not [e for e in logs if e["event"] in ("session.final_save", "session.stopped")]
            stopped = [e for e in logs if e["event"] == "session.stopped_fenced"]
        # Nothing reached the store; both homes are kept whole, set aside for an operator.
        for workspace_id in WORKSPACES:
            assert not gateway.archive_path(workspace_id).exists()
            assert await gateway.session(workspace_id) is None
        kept = sorted(orphaned.iterdir())
        assert len(kept) == 2
        assert {str(path) for path in kept} == {e["kept_at"] for e in stopped}
        for home in kept:
            assert (home / "codex-home" / "fake-codex-start.json").exists()
            # The fake writes its exit record when asked to stop: it never was.
            assert not (home / "codex-home" / "fake-codex-exit.json").exists()

        # Fenced: no session starts, not even a new workspace's ...
        refused = await rejected_connect(gateway.ws_url, bearer(token_for("ws_fence_new")))
        assert refused.status_code == 503
        assert b"lost contact with the store" in (refused.body or b"")
        # ... until the pod's hold on the store is confirmed again.
        manager.lift_fence()
        async with connect(gateway, WORKSPACES[0]) as again:
            assert await again.result("thread/list", {}) is not None
    finally:
        await gateway.shutdown()


async def test_a_session_fenced_while_its_final_save_is_stuck_is_set_aside_unsaved(
    nursery: trio.Nursery, tmp_path: Path, fake_codex_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    managers = recorded_managers(monkeypatch)
    gateway = await start_gateway(nursery, gateway_env(tmp_path, fake_codex_bin))
    [manager] = managers
    release = trio.Event()
    saving = trio.Event()

    async def stuck_save(*args: object, **kwargs: object) -> object:
        saving.set()
        await release.wait()
        raise AssertionError("a fenced session's save must not go on")

    try:
        async with connect(gateway, "ws_fence_saving") as rpc:
            await rpc.result("thread/start", {})
        # The client left; stop it (as an idle or drain stop would) with a store that hangs.
        monkeypatch.setattr(type(manager._services.persistence), "save", stuck_save)
        with trio.fail_after(10):
            restart = trio.Event()
            answers = []

            async def restart_it() -> None:
                answers.append(await gateway.restart("ws_fence_saving"))
                restart.set()

            nursery.start_soon(restart_it)
            await saving.wait()
            manager.fence_all("test: the keeper fired")
            await restart.wait()
        # The restart's answer says what became of the home.
        assert answers[0].status_code == 503 and "fenced" in answers[0].text
        assert manager._sessions.get("ws_fence_saving") is None
        assert not gateway.archive_path("ws_fence_saving").exists()
        [kept] = (Path(gateway.config.tmp_root) / ".orphaned").iterdir()
        assert (kept / "codex-home" / "fake-codex-start.json").exists()
    finally:
        release.set()
        manager.lift_fence()
        await gateway.shutdown()


def slow_starting_launcher(directory: Path, marker: Path) -> Path:
    """A codex that ignores SIGTERM and takes a while before it becomes the fake codex."""
    directory.mkdir(parents=True, exist_ok=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    marker.chmod(0o666)
    fake = f"{shlex.quote(str(fake_codex_python()))} {shlex.quote(str(FAKE_CODEX_SCRIPT))}"
    path = directory / "codex-slow"
    path.write_text(
        "\n".join(
            [
                "#!/bin/sh",
                f'if [ "$1" = "--version" ]; then exec {fake} "$@"; fi',
                "trap '' TERM",
                f"echo $$ >> {shlex.quote(str(marker))}",
                "sleep 30",
                f'exec {fake} "$@"',
            ]
        )
        + "\n"
    )
    path.chmod(0o755)
    return path


async def test_a_child_still_starting_when_fenced_is_killed_without_its_grace(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    managers = recorded_managers(monkeypatch)
    marker = tmp_path / "marks" / "started"
    launcher = slow_starting_launcher(tmp_path / "bin", marker)
    gateway = await start_gateway(
        nursery,
        gateway_env(tmp_path, launcher, CXG_CHILD_STOP_GRACE=STOP_GRACE),
    )
    [manager] = managers
    refused: list[int] = []

    async def first_connect() -> None:
        answer = await rejected_connect(gateway.ws_url, bearer(token_for("ws_fence_start")))
        refused.append(answer.status_code)

    try:
        with structlog.testing.capture_logs() as logs:
            nursery.start_soon(first_connect)
            await eventually(lambda: bool(marker.read_text().strip()), within=15)
            stat = read_stat(int(marker.read_text().split()[0]))
            assert stat is not None
            fenced_at = trio.current_time()
            manager.fence_all("test: fenced while a child starts")
            await eventually(lambda: not is_running(stat.pid, stat.start_time), within=10)
            # Far inside the 60 s grace the starting child would otherwise get.
            assert trio.current_time() - fenced_at < 10
            await eventually(lambda: bool(refused), within=15)
        assert refused[0] == 503
        assert [e for e in logs if e["event"] == "session.stopped_fenced"]
        assert not [e for e in logs if e["event"] in ("session.final_save", "session.crashed")]
        assert not gateway.archive_path("ws_fence_start").exists()
    finally:
        manager.lift_fence()
        await gateway.shutdown()
