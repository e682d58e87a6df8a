"""Sessions through the gateway with the REAL codex 0.169.0 as the child (issue 2, SPEC §4, §9).

No model is reachable here (the provider points at a closed loopback port): a turn records the
user message, writes the thread's rollout file and then keeps retrying until it is interrupted,
which is exactly what the persistence path needs.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import trio

from gateway_tests.harness import (
    RunningGateway,
    bearer,
    connect,
    eventually,
    listening_ports,
    rejected_connect,
    token_for,
)
from gateway_tests.real_codex_turns import STEP_TIMEOUT, record_user_message


async def test_real_codex_thread_is_recorded_saved_and_restored_across_a_restart(
    real_gateway: RunningGateway, tmp_path: Path
) -> None:
    codex_home = tmp_path / "sessions" / "ws_real" / "codex-home"
    text = "hello through the gateway"
    with trio.fail_after(STEP_TIMEOUT * 3):
        async with connect(real_gateway, "ws_real") as rpc:
            thread = (await rpc.result("thread/start", {}))["thread"]
            thread_id = thread["id"]
            rollout = Path(thread["path"])
            assert rollout.is_relative_to(codex_home / "sessions")
            assert thread_id in rollout.name

            # The turn keeps retrying the unreachable model until it is interrupted.
            turn = await record_user_message(rpc, thread_id, text)
            assert turn["status"] == "interrupted"
            await eventually(rollout.exists, within=STEP_TIMEOUT)
            assert text in rollout.read_text()

            response = await real_gateway.restart("ws_real")
            assert response.status_code == 204
            assert (await rpc.closed()).code == 1012

        assert real_gateway.archive_path("ws_real").exists()
        # The saved home is gone from disk: the next session must restore it from the store.
        assert not codex_home.exists()

        async with connect(real_gateway, "ws_real") as rpc:
            listed = await rpc.result("thread/list", {})
            assert thread_id in {t["id"] for t in listed["data"]}
            resumed = await rpc.result("thread/resume", {"threadId": thread_id})
            assert resumed["thread"]["id"] == thread_id
            assert rollout.exists()
            assert text in rollout.read_text()


async def test_other_processes_cannot_talk_to_the_real_child(real_gateway: RunningGateway) -> None:
    async with connect(real_gateway, "ws_real_private"):
        entry = await real_gateway.session("ws_real_private")
        assert entry is not None and entry["pid"]
        ports = listening_ports(entry["pid"])
        assert len(ports) == 1, ports
        (port,) = ports
        async with httpx2.AsyncClient(timeout=10) as http:
            # It is the app-server's port: its readiness probe answers without a token.
            assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        for headers in ([], bearer(token_for("ws_real_private"))):
            rejected = await rejected_connect(f"ws://127.0.0.1:{port}/", headers)
            assert rejected.status_code == 401
