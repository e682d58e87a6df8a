"""Model credentials through the whole gateway, with the REAL codex as the child.

The daemon builds each session's credentials with ``credentials_factory``; these tests make it
build :class:`SessionModelCredentials` (and keep a handle on each one, to wait for its token
refreshes) so that the session core's own ``prime`` / ``provider`` / ``child_env`` /
``keep_fresh`` calls are what is exercised.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.credentials import SessionModelCredentials
from gateway_tests.daemon_credentials import install_credentials
from gateway_tests.fakes.fake_agentserver import FakeAgentserver
from gateway_tests.fakes.fake_model_server import FakeModelServer
from gateway_tests.harness import LaunchGateway, connect
from gateway_tests.process_trees import secrets_in_processes

SECRET = "agentserver-internal-secret"
WORKSPACE = "ws_model_token_gw"
TURN_TIMEOUT = 30.0


def completes(turn_id: str) -> Callable[[dict[str, Any]], bool]:
    """Whether a ``turn/completed`` notification is the one of ``turn_id``."""
    return lambda message: bool(message["params"]["turn"]["id"] == turn_id)


async def test_rotations_through_the_gateway_keep_one_child(
    launch_gateway: LaunchGateway,
    nursery: trio.Nursery,
    real_codex_bin: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[SessionModelCredentials] = []
    install_credentials(monkeypatch, made)
    agentserver = FakeAgentserver(internal_secret=SECRET)
    agentserver.connect_modelserver(WORKSPACE, rotate_every=2.0, ttl=4.0)
    model = FakeModelServer(accept=lambda token: agentserver.token_valid(WORKSPACE, token))
    agentserver_url = await nursery.start(agentserver.serve)
    model_url = await nursery.start(model.serve)
    running = await launch_gateway(
        real_codex_bin,
        CXG_AGENTSERVER_INTERNAL_URL=agentserver_url,
        CXG_AGENTSERVER_INTERNAL_SECRET=SECRET,
        CXG_MODEL_PROVIDER_BASE_URL=f"{model_url}/v1",
        CXG_CHILD_READY_TIMEOUT="60s",
    )
    async with connect(running, WORKSPACE) as rpc:
        (creds,) = made
        entry = await running.session(WORKSPACE)
        assert entry is not None
        pid = entry["pid"]
        thread = await rpc.result("thread/start", {})
        thread_id = thread["thread"]["id"]

        for rotation in range(3):
            if rotation:
                with trio.fail_after(20):
                    await creds.wait_for_version(1 + rotation)
            turn = await rpc.result(
                "turn/start",
                {"threadId": thread_id, "input": [{"type": "text", "text": f"r{rotation}"}]},
            )
            with trio.fail_after(TURN_TIMEOUT):
                done = await rpc.wait_for("turn/completed", completes(turn["turn"]["id"]))
            assert done["params"]["turn"]["status"] == "completed", done
            entry = await running.session(WORKSPACE)
            assert entry is not None and entry["pid"] == pid

        accepted = [r.token for r in model.responses_requests()]
        assert len(set(accepted)) == 3
        tokens = agentserver.issued_tokens(WORKSPACE)
        assert not secrets_in_processes(pid, tokens)
    await running.shutdown()

    # Saved on shutdown: the archive holds CODEX_HOME only, never the token file or a token.
    assert not secrets_in_archive(running.archive_path(WORKSPACE), tokens)


def secrets_in_archive(path: Path, secrets: list[str]) -> list[str]:
    """Members of a CODEX_HOME archive that are a token file or contain one of ``secrets``."""
    found = []
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            extracted = archive.extractfile(member) if member.isfile() else None
            content = extracted.read() if extracted is not None else b""
            if member.name.endswith("model-token") or any(s.encode() in content for s in secrets):
                found.append(member.name)
    return found
