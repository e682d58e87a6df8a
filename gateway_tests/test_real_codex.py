"""Sessions through the gateway with the REAL codex 0.169.0 as the child (issue 2, SPEC §4, §9).

No model is reachable here (the provider points at a closed loopback port): a turn records the
user message, writes the thread's rollout file and then keeps retrying until it is interrupted,
which is exactly what the persistence path needs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from gateway_tests.harness import (
    RunningGateway,
    connect,
    eventually,
    real_codex_env,
    start_gateway,
    token_for,
)

# Generous bounds for a real codex on a busy machine; each step normally takes ~1 s.
STEP_TIMEOUT = 30.0
TCP_LISTEN = "0A"


@pytest.fixture
async def gateway(
    nursery: trio.Nursery, tmp_path: Path, real_codex_bin: Path
) -> AsyncIterator[RunningGateway]:
    """A gateway whose sessions run the real codex, with an unreachable model provider."""
    env = await real_codex_env(tmp_path, real_codex_bin)
    running = await start_gateway(nursery, env)
    yield running
    await running.shutdown()


def is_user_message(text: str) -> Callable[[dict[str, Any]], bool]:
    """Whether an ``item/completed`` notification is the user message ``text``."""

    def check(message: dict[str, Any]) -> bool:
        item = message["params"]["item"]
        return item.get("type") == "userMessage" and any(
            part.get("text") == text for part in item.get("content", [])
        )

    return check


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on, from its fds and its view of /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN and inode in inodes:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


async def test_real_codex_thread_is_recorded_saved_and_restored_across_a_restart(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    codex_home = tmp_path / "sessions" / "ws_real" / "codex-home"
    text = "hello through the gateway"
    with trio.fail_after(STEP_TIMEOUT * 3):
        async with connect(gateway, "ws_real") as rpc:
            thread = (await rpc.result("thread/start", {}))["thread"]
            thread_id = thread["id"]
            rollout = Path(thread["path"])
            assert rollout.is_relative_to(codex_home / "sessions")
            assert thread_id in rollout.name

            turn = (
                await rpc.result(
                    "turn/start",
                    {"threadId": thread_id, "input": [{"type": "text", "text": text}]},
                )
            )["turn"]
            await rpc.wait_for("item/completed", is_user_message(text))
            await eventually(rollout.exists, within=STEP_TIMEOUT)
            assert text in rollout.read_text()

            # The turn keeps retrying the unreachable model until it is interrupted.
            await rpc.result("turn/interrupt", {"threadId": thread_id, "turnId": turn["id"]})
            completed = await rpc.wait_for(
                "turn/completed", lambda m: m["params"]["turn"]["id"] == turn["id"]
            )
            assert completed["params"]["turn"]["status"] == "interrupted"

            response = await gateway.restart("ws_real")
            assert response.status_code == 204
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await rpc.ws.get_message()
            assert closed.value.reason is not None and closed.value.reason.code == 1012

        assert gateway.archive_path("ws_real").exists()
        # The saved home is gone from disk: the next session must restore it from the store.
        assert not codex_home.exists()

        async with connect(gateway, "ws_real") as rpc:
            listed = await rpc.result("thread/list", {})
            assert thread_id in {t["id"] for t in listed["data"]}
            resumed = await rpc.result("thread/resume", {"threadId": thread_id})
            assert resumed["thread"]["id"] == thread_id
            assert rollout.exists()
            assert text in rollout.read_text()


async def test_other_processes_cannot_talk_to_the_real_child(gateway: RunningGateway) -> None:
    async with connect(gateway, "ws_real_private"):
        entry = await gateway.session("ws_real_private")
        assert entry is not None and entry["pid"]
        ports = listening_ports(entry["pid"])
        assert len(ports) == 1, ports
        (port,) = ports
        async with httpx2.AsyncClient(timeout=10) as http:
            # It is the app-server's port: its readiness probe answers without a token.
            assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        workspace_token = [(b"authorization", f"Bearer {token_for('ws_real_private')}".encode())]
        for headers in ([], workspace_token):
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(f"ws://127.0.0.1:{port}/", extra_headers=headers):
                    pass
            assert rejected.value.status_code == 401
