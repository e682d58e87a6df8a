"""What keeps a session from being stopped as idle (issue 11, SPEC §4.5).

A session is idle only when no client is attached and no turn is running, for
``CXG_IDLE_SHUTDOWN``: an attached, silent client keeps it; a turn running with no client
attached keeps it (the real codex, with the fake model holding its answer); with neither, it
is stopped and saved.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog
import trio

from gateway.sessions.turns import is_running
from gateway_tests.fakes.fake_model_server import FakeModelServer, TextReply
from gateway_tests.harness import LaunchGateway, connect, eventually

IDLE = 1.0
API_KEY = "sk-idle-test"


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry.get("event") == name]


async def test_an_attached_silent_client_keeps_its_session_past_the_idle_time(
    launch_gateway: LaunchGateway,
) -> None:
    gateway = await launch_gateway(CXG_IDLE_SHUTDOWN=f"{IDLE:g}s")
    with structlog.testing.capture_logs() as logs:
        async with connect(gateway, "ws_quiet") as rpc:
            pid = int((await rpc.result("fake/pid"))["pid"])
            # Time passing is the behaviour under test: several idle periods, no frame.
            await trio.sleep(IDLE * 4)
            assert _events(logs, "session.idle") == []
            assert int((await rpc.result("fake/pid"))["pid"]) == pid
        # Once the client has left, the idle time runs from its leaving.
        await eventually(lambda: bool(_events(logs, "session.idle")), within=IDLE * 10)
        await eventually(lambda: bool(_events(logs, "session.stopped")), within=15)
    assert gateway.archive_path("ws_quiet").exists()
    assert await gateway.session("ws_quiet") is None


async def test_a_turn_running_without_a_client_keeps_the_session_until_it_ends(
    launch_gateway: LaunchGateway, nursery: trio.Nursery, real_codex_bin: Path
) -> None:
    hold = trio.Event()
    model = FakeModelServer(accept=lambda token: token == API_KEY)
    model.script.append(TextReply("the long answer", hold=hold))
    model_url = await nursery.start(model.serve)
    gateway = await launch_gateway(
        real_codex_bin,
        CXG_IDLE_SHUTDOWN=f"{IDLE:g}s",
        CXG_MODEL_PROVIDER_BASE_URL=f"{model_url}/v1",
        CXG_CODEX_API_KEY=API_KEY,
        CXG_MODEL="idle-test-model",
        CXG_CHILD_READY_TIMEOUT="60s",
    )
    with structlog.testing.capture_logs() as logs, trio.fail_after(90):
        async with connect(gateway, "ws_long_turn") as rpc:
            entry = await gateway.session("ws_long_turn")
            assert entry is not None
            pid = entry["pid"]
            thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
            await rpc.result(
                "turn/start",
                {"threadId": thread_id, "input": [{"type": "text", "text": "think long"}]},
            )
            await model.wait_until(lambda: bool(model.responses_requests()))
        # No client now; the model still holds its answer. Two checks find the turn.
        await eventually(
            lambda: len(_events(logs, "session.idle_but_turn_running")) >= 2, within=30
        )
        assert _events(logs, "session.idle") == []
        entry = await gateway.session("ws_long_turn")
        assert entry is not None and entry["pid"] == pid and entry["clients"] == 0

        hold.set()
        await eventually(lambda: bool(_events(logs, "session.idle")), within=30)
        await eventually(lambda: bool(_events(logs, "session.stopped")), within=30)
    assert gateway.archive_path("ws_long_turn").exists()
    assert await gateway.session("ws_long_turn") is None


def test_only_a_turn_that_can_go_on_by_itself_counts_as_running() -> None:
    assert is_running({"type": "active", "activeFlags": []})
    # Nobody attached can answer an approval or a question: that turn does not hold the session.
    assert not is_running({"type": "active", "activeFlags": ["waitingOnApproval"]})
    assert not is_running({"type": "active", "activeFlags": ["waitingOnUserInput"]})
    for status in (
        {"type": "idle"},
        {"type": "notLoaded"},
        {"type": "systemError"},
        None,
        "active",
    ):
        assert not is_running(status)
