"""The executor channel: the session's side served in-process, env-mcp as codex starts it.

The session's half (``serve_executor_channel`` with an ``ExecutorDirectory`` asking the fake
exec gateway) runs in the test; env-mcp is the real subprocess in the multiplexed layout, whose
bridge connections reach a real ``codex exec-server`` through the fake exec gateway. The
whole-gateway tests with the real codex are in ``test_executors_live.py``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from gateway.envmcp.channel import (
    MAX_REQUEST_BYTES,
    SOCKET_NAME,
    ChannelError,
    GrantRequest,
    ListRequest,
    ask,
    parse_environments,
    parse_grant,
    parse_request,
)
from gateway.envmcp.specs import EXECUTOR_TOOLS
from gateway.sessions import executor_channel
from gateway.sessions.executor_channel import (
    TokenBucket,
    descends_from,
)
from gateway_tests.envmcp_channel_harness import (
    CHANNEL_ENV,
    channel_command,
    channel_envmcp,
    served_channel,
)
from gateway_tests.envmcp_stdio import (
    CAP_SECRET,
    NOT_IMPORTED_AT_START,
    McpStdioClient,
    result_text,
    running_envmcp,
)
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway, run_exec_server


@pytest.fixture
async def gateway_a(real_codex_bin: Path, tmp_path: Path) -> AsyncIterator[FakeExecGateway]:
    """The fake exec gateway: exe_alpha and exe_beta in ws_a, exe_gamma in ws_b (real backend)."""
    home = tmp_path / "executor-home"
    home.mkdir()
    gateway = FakeExecGateway(internal_secret="in-s3cret", captoken_secret=CAP_SECRET)
    async with trio.open_nursery() as nursery:
        backend = await nursery.start(run_exec_server, real_codex_bin, home)
        for exe_id, workspace_id in (
            ("exe_alpha", "ws_a"),
            ("exe_beta", "ws_a"),
            ("exe_gamma", "ws_b"),
        ):
            gateway.add_executor(exe_id, workspace_id=workspace_id, backend_url=backend)
        await nursery.start(gateway.serve)
        yield gateway
        nursery.cancel_scope.cancel()


async def _raw(path: Path, payload: bytes) -> dict[str, Any]:
    """Send ``payload`` as it is; return the decoded answer line."""
    with trio.fail_after(15):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(payload)
            answer = b""
            while b"\n" not in answer:
                chunk = await stream.receive_some()
                assert chunk, f"channel closed without answering; got {answer!r}"
                answer += chunk
    decoded: dict[str, Any] = json.loads(answer)
    return decoded


# -- the protocol, pure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"op":"list","workspace_id":"ws_b"}', "unexpected keys"),
        (b'{"op":"grant","environment_id":"e","workspace_id":"ws_b"}', "unexpected keys"),
        (b'{"op":"grant"}', "unexpected keys"),
        (b'{"op":"grant","environment_id":"a","environment_id":"b"}', "repeated key"),
        (b'{"op":"mint","environment_id":"e"}', "op must be"),
        (b'{"op":"grant","environment_id":""}', "non-empty string"),
        (b'{"op":"grant","environment_id":7}', "non-empty string"),
        (b'{"op":"grant","environment_id":"e\\u0000x"}', "control characters"),
        (b'{"op":"grant","environment_id":"' + b"e" * 300 + b'"}', "longer than"),
        (b"[1,2]", "not a JSON object"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"{", "not valid UTF-8 JSON"),
        (b"[" * 100000 + b"]" * 100000, "larger than"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(ChannelError, match=message):
        parse_request(raw)


def test_good_requests_parse() -> None:
    assert parse_request(b'{"op":"list"}') == ListRequest()
    assert parse_request(b'{"op":"grant","environment_id":"exe a"}') == GrantRequest("exe a")


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5
    assert [bucket.take(), bucket.take()] == [True, False]


def test_descent_is_read_from_parent_links() -> None:
    assert descends_from(os.getpid(), os.getpid())
    assert descends_from(os.getpid(), os.getppid())
    assert not descends_from(os.getppid(), os.getpid())
    assert not descends_from(1, os.getpid())


# -- the session's side, served ----------------------------------------------------------------


async def test_list_and_grant_follow_the_exec_gateway_live(
    tmp_path: Path, gateway_a: FakeExecGateway
) -> None:
    gateway_a.executors["exe_beta"].connected = False
    async with served_channel(tmp_path, gateway_a) as path:
        first = parse_environments(await ask(str(path), ListRequest()))
        gateway_a.executors["exe_beta"].connected = True
        second = parse_environments(await ask(str(path), ListRequest()))
        grant = parse_grant(await ask(str(path), GrantRequest("exe_beta")))
    assert [e.id for e in first] == ["exe_alpha"]
    assert [e.id for e in second] == ["exe_alpha", "exe_beta"]
    assert grant.bridge_url == f"{gateway_a.ws_url}/bridge/exe_beta"
    # Exactly the token the exec gateway verifies: this executor, this workspace.
    assert gateway_a._authorise("exe_beta", f"Bearer {grant.token}") == (0, "")
    assert gateway_a._authorise("exe_alpha", f"Bearer {grant.token}")[0] == 403


async def test_the_socket_is_private_and_gone_after_the_session(
    tmp_path: Path, gateway_a: FakeExecGateway
) -> None:
    async with served_channel(tmp_path, gateway_a) as path:
        mode = path.stat().st_mode & 0o777
    assert mode == 0o600
    assert not path.exists()


async def test_foreign_and_unlisted_executors_are_refused(
    tmp_path: Path, gateway_a: FakeExecGateway
) -> None:
    gateway_a.executors["exe_beta"].connected = False
    async with served_channel(tmp_path, gateway_a) as path:
        for exe_id in ("exe_gamma", "exe_beta", "exe_nobody"):
            with pytest.raises(ChannelError, match="is not connected to this workspace"):
                parse_grant(await ask(str(path), GrantRequest(exe_id)))


async def test_forged_requests_are_refused_and_the_channel_serves_on(
    tmp_path: Path, gateway_a: FakeExecGateway
) -> None:
    forged = [
        (b'{"op":"grant","environment_id":"exe_gamma","workspace_id":"ws_b"}\n', "unexpected"),
        (b'{"op":"list"}\n{"op":"list"}\n', "one request per connection"),
        (b"x" * (MAX_REQUEST_BYTES + 10) + b"\n", "larger than"),
        (b'{"op":"list"}', "without a newline"),
        (b"\x00\x01\x02\n", "not valid UTF-8 JSON"),
    ]
    async with served_channel(tmp_path, gateway_a) as path:
        answers = []
        for payload, _ in forged:
            if payload.endswith(b"}"):
                # No newline: the request ends when the writer shuts its side down.
                with trio.fail_after(15):
                    stream = await trio.open_unix_socket(str(path))
                    async with stream:
                        await stream.send_all(payload)
                        await stream.send_eof()
                        answers.append(json.loads(await stream.receive_some()))
            else:
                answers.append(await _raw(path, payload))
        still = parse_environments(await ask(str(path), ListRequest()))
    for (_, reason), answer in zip(forged, answers, strict=True):
        assert answer["ok"] is False
        assert reason in answer["error"]
    assert [e.id for e in still] == ["exe_alpha", "exe_beta"]
    # No forged request minted anything.
    assert all("token" not in answer for answer in answers)


async def test_a_peer_that_is_not_the_sessions_is_refused(
    tmp_path: Path, gateway_a: FakeExecGateway
) -> None:
    seen: list[tuple[int, int]] = []

    def admits(pid: int, uid: int) -> str | None:
        seen.append((pid, uid))
        return "the peer is not a process of this session"

    async with served_channel(tmp_path, gateway_a, admits=admits) as path:
        with pytest.raises(ChannelError, match="not a process of this session"):
            parse_grant(await ask(str(path), GrantRequest("exe_alpha")))
    # The kernel's record of the peer, not anything the peer said.
    assert seen == [(os.getpid(), os.geteuid())]


async def test_a_flood_is_rate_limited(
    tmp_path: Path, gateway_a: FakeExecGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor_channel, "RATE_BURST", 3)
    monkeypatch.setattr(executor_channel, "RATE_PER_SECOND", 0.001)
    async with served_channel(tmp_path, gateway_a, max_age=60) as path:
        results = []
        for _ in range(5):
            try:
                parse_environments(await ask(str(path), ListRequest()))
                results.append("ok")
            except ChannelError as exc:
                results.append(str(exc))
    assert results[:3] == ["ok", "ok", "ok"]
    assert all("too many requests" in r for r in results[3:])


async def test_a_long_socket_path_is_reached(tmp_path: Path, gateway_a: FakeExecGateway) -> None:
    deep = tmp_path / ("d" * 90) / ("e" * 40)
    deep.mkdir(parents=True)
    assert len(str(deep / "run" / SOCKET_NAME)) > 108
    async with served_channel(deep, gateway_a) as path:
        environments = parse_environments(await ask(str(path), ListRequest()))
    assert [e.id for e in environments] == ["exe_alpha", "exe_beta"]


async def test_an_exec_gateway_outage_is_a_clear_refusal(
    tmp_path: Path, gateway_a: FakeExecGateway
) -> None:
    gateway_a.outage = True
    async with served_channel(tmp_path, gateway_a) as path:
        with pytest.raises(ChannelError, match="exec gateway could not be asked"):
            parse_environments(await ask(str(path), ListRequest()))


# -- env-mcp in the multiplexed layout ---------------------------------------------------------


async def _call(client: McpStdioClient, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    answer = await client.request("tools/call", {"name": name, "arguments": arguments})
    assert "result" in answer, answer
    result: dict[str, Any] = answer["result"]
    return result


async def test_multiplexed_tools_take_an_environment_id(
    tmp_path: Path, gateway_a: FakeExecGateway
) -> None:
    async with served_channel(tmp_path, gateway_a) as path, channel_envmcp(path) as client:
        with trio.fail_after(30):
            tools = (await client.request("tools/list"))["result"]["tools"]
    by_name = {tool["name"]: tool for tool in tools}
    assert list(by_name) == ["list_environments", *(spec.name for spec in EXECUTOR_TOOLS)]
    shell = by_name["shell"]["inputSchema"]
    assert shell["required"] == ["environment_id", "command"]
    assert shell["properties"]["environment_id"]["type"] == "string"
    assert "list_environments" in by_name["shell"]["description"]
    # Listing touched neither the exec gateway nor a bridge.
    assert gateway_a.connected_requests == []
    assert gateway_a.bridge_attempts == []


async def test_an_executor_connecting_later_is_listed_and_runs_commands(
    tmp_path: Path, gateway_a: FakeExecGateway
) -> None:
    gateway_a.executors["exe_beta"].connected = False
    async with served_channel(tmp_path, gateway_a) as path, channel_envmcp(path) as client:
        with trio.fail_after(60):
            before = await _call(client, "list_environments", {})
            early = await _call(client, "shell", {"environment_id": "exe_beta", "command": ["id"]})
            gateway_a.executors["exe_beta"].connected = True
            after = await _call(client, "list_environments", {})
            ran = await _call(
                client, "shell", {"environment_id": "exe_beta", "command": ["echo", "hello"]}
            )
    assert before["isError"] is False
    assert [e["id"] for e in json.loads(result_text(before))["environments"]] == ["exe_alpha"]
    assert early["isError"] is True
    assert "exe_beta" in result_text(early)
    assert "is not connected to this workspace" in result_text(early)
    listed = json.loads(result_text(after))["environments"]
    assert [e["id"] for e in listed] == ["exe_alpha", "exe_beta"]
    assert ran["isError"] is False, ran
    assert "hello" in result_text(ran)
    assert [a.exe_id for a in gateway_a.bridge_attempts] == ["exe_beta"]
    assert gateway_a.bridge_attempts[0].status == 101


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"command": ["id"]}, "environment_id must be a non-empty string"),
        ({"environment_id": 3, "command": ["id"]}, "environment_id must be a non-empty string"),
        ({"environment_id": "exe_alpha", "command": "id"}, "not a string"),
    ],
)
async def test_bad_environment_arguments_are_explained_without_a_bridge(
    tmp_path: Path, gateway_a: FakeExecGateway, arguments: dict[str, Any], message: str
) -> None:
    async with served_channel(tmp_path, gateway_a) as path, channel_envmcp(path) as client:
        with trio.fail_after(30):
            result = await _call(client, "shell", arguments)
    assert result["isError"] is True
    assert message in result_text(result)
    assert gateway_a.bridge_attempts == []


async def test_no_session_channel_is_a_clear_tool_error(tmp_path: Path) -> None:
    async with channel_envmcp(tmp_path / "missing.sock") as client:
        with trio.fail_after(30):
            listed = await _call(client, "list_environments", {})
            shell = await _call(client, "shell", {"environment_id": "e", "command": ["id"]})
    assert listed["isError"] is True
    assert "cannot reach the session's executor channel" in result_text(listed)
    assert shell["isError"] is True
    assert "cannot reach the session's executor channel" in result_text(shell)


async def test_no_executors_says_how_to_get_one(tmp_path: Path, gateway_a: FakeExecGateway) -> None:
    for executor in gateway_a.executors.values():
        executor.connected = False
    async with served_channel(tmp_path, gateway_a) as path, channel_envmcp(path) as client:
        with trio.fail_after(30):
            listed = await _call(client, "list_environments", {})
    assert listed["isError"] is False
    assert "No executor is connected to this workspace right now" in result_text(listed)


async def test_connections_beyond_the_bound_wait_their_turn(
    tmp_path: Path, gateway_a: FakeExecGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor_channel, "MAX_CONCURRENT", 1)
    async with served_channel(tmp_path, gateway_a) as path:
        idle = await trio.open_unix_socket(str(path))
        answers: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def second() -> None:
                answers.append(await ask(str(path), ListRequest()))

            nursery.start_soon(second)
            # Everything is blocked: the channel serves the idle connection, the second waits.
            await trio.testing.wait_all_tasks_blocked(cushion=0.2)
            assert answers == []
            await idle.aclose()
        assert [e.id for e in parse_environments(answers[0])] == ["exe_alpha", "exe_beta"]


async def test_tools_list_in_the_multiplexed_layout_imports_no_bridge(tmp_path: Path) -> None:
    command = [sys.executable, "-X", "importtime", "-m", "gateway", "env-mcp"]
    command += channel_command()[3:]
    stderr_path = tmp_path / "importtime.txt"
    with stderr_path.open("wb") as stderr:
        env = {CHANNEL_ENV: str(tmp_path / "none.sock")}
        async with running_envmcp(command, env, stderr=stderr) as client:
            with trio.fail_after(60):
                await client.initialize()
                tools = await client.request("tools/list")
    assert [tool["name"] for tool in tools["result"]["tools"]] == [
        "list_environments",
        *(spec.name for spec in EXECUTOR_TOOLS),
    ]
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in stderr_path.read_text().splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "gateway.envmcp.server" in imported
    for module in NOT_IMPORTED_AT_START:
        early = sorted(name for name in imported if name == module or name.startswith(module + "."))
        assert early == [], f"{module} imported before the first tool call"
