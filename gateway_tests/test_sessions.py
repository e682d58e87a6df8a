"""Sessions end to end through the gateway, with the fake codex as the child (SPEC §4, §8)."""

from __future__ import annotations

import json
import os
import signal
import tarfile
from pathlib import Path

import pytest
import trio

from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import (
    HMAC_SECRET,
    LaunchGateway,
    RunningGateway,
    bearer,
    closed_port,
    connect,
    eventually,
    process_environ,
    rejected_connect,
    token_for,
)


async def _pid(rpc) -> int:  # type: ignore[no-untyped-def]
    return int((await rpc.result("fake/pid"))["pid"])


async def test_fifty_simultaneous_first_connects_start_exactly_one_child(
    gateway: RunningGateway,
) -> None:
    pids: list[int] = []

    async def client() -> None:
        async with connect(gateway, "ws_storm") as rpc:
            pids.append(await _pid(rpc))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(client)
    assert len(pids) == 50
    assert len(set(pids)) == 1
    sessions = await gateway.sessions()
    assert [s["workspaceId"] for s in sessions] == ["ws_storm"]


async def test_two_workspaces_get_two_children(gateway: RunningGateway) -> None:
    async with connect(gateway, "ws_one") as one, connect(gateway, "ws_two") as two:
        first, second = await _pid(one), await _pid(two)
    assert first != second
    assert {s["workspaceId"] for s in await gateway.sessions()} == {"ws_one", "ws_two"}


async def test_second_client_shares_the_child_and_both_work(gateway: RunningGateway) -> None:
    async with connect(gateway, "ws_pair") as one, connect(gateway, "ws_pair") as two:
        thread_one = (await one.result("thread/start", {}))["thread"]["id"]
        thread_two = (await two.result("thread/start", {}))["thread"]["id"]
        assert thread_one != thread_two
        assert await _pid(one) == await _pid(two)
        listed = await two.result("thread/list", {})
        assert {t["id"] for t in listed["data"]} >= {thread_one, thread_two}
        entry = await gateway.session("ws_pair")
        assert entry is not None and entry["clients"] == 2


async def test_child_environment_holds_no_gateway_secret(
    launch_gateway: LaunchGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Secrets the gateway process holds: in its environment and in its configuration.
    monkeypatch.setenv("CXG_AGENTSERVER_INTERNAL_SECRET", "agentserver-secret-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    gateway = await launch_gateway(CXG_S3_SECRET_ACCESS_KEY="s3-secret-value")
    async with connect(gateway, "ws_env") as rpc:
        environ = process_environ(await _pid(rpc))
    assert not [name for name in environ if name.startswith("CXG_")]
    leaked = {"agentserver-secret-value", "aws-secret-value", "s3-secret-value", HMAC_SECRET}
    assert not leaked & set(environ.values())
    assert "AWS_SECRET_ACCESS_KEY" not in environ
    assert environ["CODEX_HOME"].startswith(str(tmp_path / "sessions"))


async def test_other_processes_cannot_talk_to_the_child(gateway: RunningGateway) -> None:
    async with connect(gateway, "ws_private") as rpc:
        pid = await _pid(rpc)
        start = json.loads(
            (Path(process_environ(pid)["CODEX_HOME"]) / "fake-codex-start.json").read_text()
        )
        child_url = start["listen"]
        assert child_url.startswith("ws://127.0.0.1:")
        # Only the hash of the capability token is on the child's command line.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--ws-token-sha256" in cmdline
        for headers in ([], bearer(token_for("ws_private"))):
            assert (await rejected_connect(child_url, headers)).status_code == 401


async def test_child_crash_closes_clients_with_1011_saves_and_respawns(
    gateway: RunningGateway,
) -> None:
    async with connect(gateway, "ws_crash") as rpc:
        thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
        pid = await _pid(rpc)
        os.kill(pid, signal.SIGKILL)
        reason = await rpc.closed(within=1)
        assert reason.code == 1011
    await eventually(lambda: gateway.archive_path("ws_crash").exists())
    async with connect(gateway, "ws_crash") as rpc:
        assert await _pid(rpc) != pid
        listed = await rpc.result("thread/list", {})
        assert thread_id in {t["id"] for t in listed["data"]}


async def test_idle_session_is_stopped_and_saved_but_a_quick_reconnect_reuses_it(
    launch_gateway: LaunchGateway, tmp_path: Path
) -> None:
    gateway = await launch_gateway(CXG_IDLE_SHUTDOWN="3s")
    async with connect(gateway, "ws_idle") as rpc:
        await rpc.result("thread/start", {})
        first = await _pid(rpc)
    async with connect(gateway, "ws_idle") as rpc:
        assert await _pid(rpc) == first
    assert not gateway.archive_path("ws_idle").exists()
    await eventually(lambda: gateway.archive_path("ws_idle").exists(), within=15)
    await eventually(lambda: not (tmp_path / "sessions" / "ws_idle").exists())
    assert await gateway.session("ws_idle") is None
    with tarfile.open(gateway.archive_path("ws_idle")) as archive:
        assert any(name.startswith("sessions/") for name in archive.getnames())


async def test_admin_restart_saves_and_the_next_connect_sees_the_thread(
    gateway: RunningGateway,
) -> None:
    async with connect(gateway, "ws_restart") as rpc:
        thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
        response = await gateway.restart("ws_restart")
        assert response.status_code == 204
        reason = await rpc.closed(within=5)
        assert reason.code == 1012
    assert gateway.archive_path("ws_restart").exists()
    async with connect(gateway, "ws_restart") as rpc:
        listed = await rpc.result("thread/list", {})
        assert thread_id in {t["id"] for t in listed["data"]}


async def test_a_workspace_token_may_restart_only_its_own_workspace(
    gateway: RunningGateway,
) -> None:
    async with connect(gateway, "ws_mine"):
        other = await gateway.restart("ws_mine", token=token_for("ws_other"))
        assert other.status_code == 403
        own = await gateway.restart("ws_mine", token=token_for("ws_mine"))
        assert own.status_code == 204


async def test_large_frames_pass_unchanged_both_ways(
    launch_gateway: LaunchGateway, tmp_path: Path
) -> None:
    launcher = make_fake_codex_launcher(tmp_path / "bin", ECHO_BINARY="1")
    gateway = await launch_gateway(launcher)
    async with connect(gateway, "ws_big") as rpc:
        payload = "x" * (60 << 20)
        reply = await rpc.result("fake/echo", {"payload": payload})
        assert reply["payload"] == payload
        blob = os.urandom(60 << 20)
        await rpc.ws.send_message(blob)
        echoed = await rpc.ws.get_message()
        assert isinstance(echoed, bytes) and echoed == blob


async def test_oversized_frame_closes_only_that_client_with_1009(
    launch_gateway: LaunchGateway,
) -> None:
    gateway = await launch_gateway(CXG_WS_MAX_MESSAGE_SIZE="1MiB")
    async with connect(gateway, "ws_limit") as bystander, connect(gateway, "ws_limit") as rpc:
        pid = await _pid(bystander)
        await rpc.ws.send_message("y" * ((1 << 20) + 1))
        reason = await rpc.closed(within=5)
        assert reason.code == 1009
        assert await _pid(bystander) == pid
        reply = await bystander.result("fake/echo", {"payload": "z" * 1000})
        assert reply["payload"] == "z" * 1000


async def test_close_codes_and_reasons_cross_the_relay(gateway: RunningGateway) -> None:
    async with connect(gateway, "ws_close") as rpc:
        codex_home = Path(process_environ(await _pid(rpc))["CODEX_HOME"])
        await rpc.send(
            {"id": 99, "method": "fake/close", "params": {"code": 4001, "reason": "later"}}
        )
        reason = await rpc.closed(within=5)
        assert (reason.code, reason.reason) == (4001, "later")

    closes = codex_home / "fake-codex-closes.jsonl"
    async with connect(gateway, "ws_close") as rpc:
        await rpc.ws.aclose(4002, "client says bye")

    def client_close_reached_child() -> bool:
        if not closes.exists():
            return False
        seen = [json.loads(line) for line in closes.read_text().splitlines()]
        return {"code": 4002, "reason": "client says bye"} in seen

    await eventually(client_close_reached_child)


async def test_connect_without_token_gets_401_missing_bearer(gateway: RunningGateway) -> None:
    rejected = await rejected_connect(gateway.ws_url)
    assert rejected.status_code == 401
    assert rejected.body == b"missing Bearer\n"


async def test_connect_with_bad_token_gets_401_and_starts_nothing(
    gateway: RunningGateway,
) -> None:
    forged = token_for("ws_victim")[:-4] + "0000"
    for token in (forged, "garbage", "ws_victim.dev.nothex"):
        rejected = await rejected_connect(gateway.ws_url, bearer(token))
        assert rejected.status_code == 401
    assert await gateway.sessions() == []


async def test_browser_origin_is_refused_with_403(gateway: RunningGateway) -> None:
    headers = [*bearer(token_for("ws_web")), (b"origin", b"https://evil.example")]
    rejected = await rejected_connect(gateway.ws_url, headers)
    assert rejected.status_code == 403


async def test_verifier_down_gives_503_not_401(launch_gateway: LaunchGateway) -> None:
    port = await closed_port()
    gateway = await launch_gateway(
        CXG_AGENTSERVER_INTERNAL_URL=f"http://127.0.0.1:{port}",
        CXG_AGENTSERVER_INTERNAL_SECRET="internal",
    )
    rejected = await rejected_connect(gateway.ws_url, bearer("ast_abcdefgh_secret"))
    assert rejected.status_code == 503


async def test_spawn_failure_gives_503_with_a_reason(
    launch_gateway: LaunchGateway, tmp_path: Path
) -> None:
    launcher = make_fake_codex_launcher(tmp_path / "bin", EXIT_AT_START="1")
    gateway = await launch_gateway(launcher)
    rejected = await rejected_connect(gateway.ws_url, bearer(token_for("ws_bad")))
    assert rejected.status_code == 503
    assert (rejected.body or b"").startswith(b"session could not start; retry shortly")
