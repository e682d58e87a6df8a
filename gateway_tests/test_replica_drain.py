"""Replica-mode drain: idle sessions leave at once, a running turn is let finish (within budget).

The daemon runs in replica mode (``CXG_PEER_ADDR`` set, moto S3) with the fake codex, whose
``__slow__`` prompt holds a turn open for as long as a test needs. On the stop signal the pod
turns unready at once and says it is draining; each session is stopped and saved when no turn
runs in it, or at ``CXG_DRAIN_BUDGET``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from gateway.config import S3Settings
from gateway.replicas.ownership import StorePlacement
from gateway.replicas.placement import SolePlacement
from gateway.sessions.outcome import StopReason
from gateway_tests import s3_server
from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import (
    Rpc,
    RunningGateway,
    closed_port,
    connect,
    gateway_env,
    start_gateway,
)
from gateway_tests.s3_control import BucketView, archive_files, s3_env

moto_server = s3_server.moto_server
s3_settings = s3_server.s3_settings

DELTA_MS = 100


async def replica_env(
    tmp_path: Path, settings: S3Settings, codex_bin: Path, **overrides: str
) -> dict[str, str]:
    """A single replica-mode daemon: its peer address points nowhere (no peer is needed)."""
    return {
        **gateway_env(tmp_path, codex_bin),
        **s3_env(settings),
        "CXG_PEER_ADDR": f"127.0.0.1:{await closed_port()}",
        "CXG_PEER_LISTEN_ADDR": "127.0.0.1:0",
        "CXG_PEER_SECRET": "test-peer-secret",
        "CXG_POD_NAME": "drain-pod",
        **overrides,
    }


async def start_turn(rpc: Rpc, text: str) -> str:
    """Start a thread and a turn on it; return the thread id once the turn streams."""
    thread_id: str = (await rpc.result("thread/start", {}))["thread"]["id"]
    await rpc.result(
        "turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": text}]}
    )
    await rpc.wait_for("item/agentMessage/delta")
    return thread_id


async def readiness(gateway: RunningGateway) -> int:
    async with httpx2.AsyncClient() as http:
        return (await http.get(f"{gateway.http_url}/readyz")).status_code


def rollout_text(bucket: BucketView, workspace_id: str) -> str:
    files = bucket.members(workspace_id)
    assert files is not None, f"{workspace_id} has no archive"
    return "".join(
        body.decode("utf-8", "replace") for name, body in files.items() if "rollout-" in name
    )


class DrainingCalls(list[str]):
    """The ``set_draining`` calls a placement received; ``told`` is set at the first."""

    def __init__(self) -> None:
        super().__init__()
        self.told = trio.Event()

    def record(self) -> None:
        self.append("draining")
        self.told.set()


@pytest.fixture
def draining_calls(monkeypatch: pytest.MonkeyPatch) -> DrainingCalls:
    """Records each ``set_draining`` the daemon's placement receives."""
    calls = DrainingCalls()
    monkeypatch.setattr(SolePlacement, "set_draining", lambda self: calls.record())
    store_set_draining = StorePlacement.set_draining

    def recorded(self: StorePlacement) -> None:
        calls.record()
        store_set_draining(self)

    monkeypatch.setattr(StorePlacement, "set_draining", recorded)
    return calls


async def test_idle_sessions_leave_at_once_and_a_running_turn_finishes_before_its_save(
    nursery: trio.Nursery,
    tmp_path: Path,
    s3_settings: S3Settings,
    moto_server: s3_server.MotoServer,
    draining_calls: DrainingCalls,
) -> None:
    deltas = 30  # a 3 s turn, well inside the default 30 s budget
    codex = make_fake_codex_launcher(
        tmp_path / "bin", SLOW_DELTAS=str(deltas), SLOW_DELTA_MS=str(DELTA_MS)
    )
    # A 1 s stop grace: a child stopped mid-turn would be killed long before its turn ends.
    gateway = await start_gateway(
        nursery, await replica_env(tmp_path, s3_settings, codex, CXG_CHILD_STOP_GRACE="1s")
    )
    bucket = BucketView(moto_server, s3_settings.bucket)
    stopped_with: dict[str, Any] = {}
    async with connect(gateway, "ws_drain_idle") as idle, connect(gateway, "ws_drain_busy") as busy:
        await idle.result("thread/start", {})
        await start_turn(busy, "__slow__ please")
        assert await readiness(gateway) == 200

        gateway.stop.set()
        # Unready at once (the daemon marks itself unready before it tells the placement), and
        # the placement is told before anything is stopped.
        with trio.fail_after(2):
            await draining_calls.told.wait()
        assert await readiness(gateway) == 503
        assert draining_calls == ["draining"]
        closed = await idle.closed(within=10)
        stopped_with["idle"] = closed.code
        # The idle session left; the busy one still streams its turn ...
        await busy.wait_for("item/agentMessage/delta")
        # ... to its end, and only then is its session stopped.
        completed = await busy.wait_for("turn/completed")
        assert completed["params"]["turn"]["status"] == "completed"
        closed = await busy.closed(within=15)
        stopped_with["busy"] = closed.code
    with trio.fail_after(30):
        await gateway.stopped.wait()
    assert stopped_with == {
        "idle": StopReason.DRAIN.close_code,
        "busy": StopReason.DRAIN.close_code,
    }
    # Both saved; the busy one's archive holds the whole turn.
    assert bucket.exists("ws_drain_idle")
    assert f"slow {deltas - 1} " in rollout_text(bucket, "ws_drain_busy")


async def test_a_turn_longer_than_the_budget_is_stopped_and_saved_at_the_budget(
    nursery: trio.Nursery,
    tmp_path: Path,
    s3_settings: S3Settings,
    moto_server: s3_server.MotoServer,
    draining_calls: DrainingCalls,
) -> None:
    budget = 2.0
    codex = make_fake_codex_launcher(
        tmp_path / "bin", SLOW_DELTAS="1000", SLOW_DELTA_MS=str(DELTA_MS)
    )
    gateway = await start_gateway(
        nursery,
        await replica_env(
            tmp_path, s3_settings, codex, CXG_DRAIN_BUDGET=f"{budget:g}s", CXG_CHILD_STOP_GRACE="1s"
        ),
    )
    bucket = BucketView(moto_server, s3_settings.bucket)
    async with connect(gateway, "ws_drain_long") as busy:
        await start_turn(busy, "__slow__ a long one")
        stop_at = trio.current_time()
        gateway.stop.set()
        closed = await busy.closed(within=budget + 15)
        took = trio.current_time() - stop_at
    assert closed.code == StopReason.DRAIN.close_code
    # Held for the budget (the turn was running), then stopped, not before.
    assert budget <= took < budget + 10
    with trio.fail_after(30):
        await gateway.stopped.wait()
    # Saved as the killed child left it: the turn it had started is in the archive.
    assert "__slow__ a long one" in rollout_text(bucket, "ws_drain_long")
    assert draining_calls == ["draining"]


async def test_without_replica_mode_a_busy_session_is_stopped_at_once_as_before(
    nursery: trio.Nursery, tmp_path: Path, draining_calls: DrainingCalls
) -> None:
    codex = make_fake_codex_launcher(
        tmp_path / "bin", SLOW_DELTAS="1000", SLOW_DELTA_MS=str(DELTA_MS)
    )
    gateway = await start_gateway(nursery, gateway_env(tmp_path, codex, CXG_CHILD_STOP_GRACE="1s"))
    async with connect(gateway, "ws_single_pod") as busy:
        await start_turn(busy, "__slow__ a long one")
        gateway.stop.set()
        # 1001 right away: the single-pod drain does not wait for turns.
        closed = await busy.closed(within=5)
    assert closed.code == StopReason.DRAIN.close_code
    with trio.fail_after(30):
        await gateway.stopped.wait()
    assert draining_calls == []
    assert archive_files(gateway.archive_path("ws_single_pod").read_bytes())
