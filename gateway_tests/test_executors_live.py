"""Live executors through the whole gateway, with the real codex child (multiplexed layout).

The session's one env-mcp asks the session, over its private channel, which executors are
connected and for a fresh token per bridge connection; the fake exec gateway verifies the
tokens and relays to a real ``codex exec-server``; the fake model server scripts the tool calls.
Every session here is the same child from start to end: nothing is restarted to see a change.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.captoken import verify_cap_token
from gateway.envmcp.channel import SOCKET_NAME, ChannelError, GrantRequest, ask, parse_grant
from gateway.sessions.process_tree import children_of
from gateway_tests.executor_fixtures import (
    CAP_SECRET,
    TURN_TIMEOUT,
    WORKSPACE,
    assert_first_request_offers,
    exec_vars,
    model_vars,
)
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway
from gateway_tests.fakes.fake_model_server import (
    FakeModelServer,
    FunctionCallReply,
    Reply,
    TextReply,
    function_call_outputs,
    output_text,
)
from gateway_tests.fakes.launchers import fake_codex_python
from gateway_tests.harness import Rpc, RunningGateway, connect, gateway_env, start_gateway

NAMESPACE = "mcp__executors"
# The base64url of the fixed cap-token header: the start of every capability token.
TOKEN_PREFIX = b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkNYRyJ9"


def _call(name: str, call_id: str, **arguments: Any) -> FunctionCallReply:
    return FunctionCallReply(namespace=NAMESPACE, name=name, arguments=arguments, call_id=call_id)


def _shell(call_id: str, environment_id: str, *command: str) -> FunctionCallReply:
    return _call("shell", call_id, environment_id=environment_id, command=list(command))


def output_of(model: FakeModelServer, call_id: str) -> str:
    """The tool output for ``call_id`` as the model received it in a later request."""
    for request in model.responses_requests():
        for item in function_call_outputs(request.body):
            if item.get("call_id") == call_id:
                return output_text(item)
    raise AssertionError(f"the output of {call_id} never reached the model")


class Conversation:
    """One thread of one client; each turn scripts the model's replies first."""

    def __init__(self, rpc: Rpc, model: FakeModelServer) -> None:
        self.rpc = rpc
        self.model = model
        self.thread_id = ""

    async def turn(self, text: str, *replies: Reply) -> dict[str, Any]:
        self.model.script.extend(replies)
        if not self.thread_id:
            thread = await self.rpc.result("thread/start", {})
            self.thread_id = thread["thread"]["id"]
        started = await self.rpc.result(
            "turn/start",
            {"threadId": self.thread_id, "input": [{"type": "text", "text": text}]},
        )
        turn_id = started["turn"]["id"]
        completed = await self.rpc.wait_for(
            "turn/completed", lambda m: m["params"]["turn"]["id"] == turn_id
        )
        turn: dict[str, Any] = completed["params"]["turn"]
        assert turn["status"] == "completed", turn
        return turn


async def _gateway(
    nursery: trio.Nursery,
    tmp_path: Path,
    codex: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
    **extra: str,
) -> RunningGateway:
    env = gateway_env(tmp_path, codex, **model_vars(model), **exec_vars(exec_gateway), **extra)
    return await start_gateway(nursery, env)


async def _child_pid(gateway: RunningGateway) -> int:
    entry = await gateway.session(WORKSPACE)
    assert entry is not None and entry["pid"], entry
    pid: int = entry["pid"]
    return pid


def _descendants(pid: int) -> Iterator[int]:
    for child in children_of(pid):
        yield child
        yield from _descendants(child)


def _envmcp_pids(child_pid: int) -> list[int]:
    pids = []
    for pid in _descendants(child_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"env-mcp" in argv:
            pids.append(pid)
    return pids


async def test_an_executor_started_after_the_session_is_listed_and_runs_a_command(
    nursery: trio.Nursery,
    tmp_path: Path,
    real_codex_bin: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    exec_gateway.executors["exe_alpha"].connected = False
    gateway = await _gateway(nursery, tmp_path, real_codex_bin, model, exec_gateway)
    try:
        with trio.fail_after(TURN_TIMEOUT):
            async with connect(gateway, WORKSPACE) as rpc:
                chat = Conversation(rpc, model)
                await chat.turn(
                    "Which executors are there?",
                    _call("list_environments", "call_list_1"),
                    TextReply("None yet."),
                )
                pid_before = await _child_pid(gateway)
                # The user starts their executor now, with the session running.
                exec_gateway.executors["exe_alpha"].connected = True
                await chat.turn(
                    "Now run echo hello on it.",
                    _call("list_environments", "call_list_2"),
                    _shell("call_shell_1", "exe_alpha", "echo", "hello"),
                    TextReply("It ran."),
                )
                pid_after = await _child_pid(gateway)
        # The thread's first request already offered the executors server (first turn).
        assert_first_request_offers(model, NAMESPACE)
        assert "No executor is connected to this workspace" in output_of(model, "call_list_1")
        listed = output_of(model, "call_list_2")
        assert "exe_alpha" in listed and "Test box" in listed
        ran = output_of(model, "call_shell_1")
        assert "hello" in ran and "[exit_code=0]" in ran
        assert [a.status for a in exec_gateway.bridge_attempts] == [101]
        assert pid_after == pid_before
    finally:
        await gateway.shutdown()


async def test_an_executor_that_disappears_gives_a_clear_tool_error(
    nursery: trio.Nursery,
    tmp_path: Path,
    real_codex_bin: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    gateway = await _gateway(nursery, tmp_path, real_codex_bin, model, exec_gateway)
    try:
        with trio.fail_after(TURN_TIMEOUT):
            async with connect(gateway, WORKSPACE) as rpc:
                chat = Conversation(rpc, model)
                await chat.turn(
                    "Run true.", _shell("call_shell_1", "exe_alpha", "true"), TextReply("Done.")
                )
                exec_gateway.executors["exe_alpha"].connected = False
                await chat.turn(
                    "Run true again.",
                    _shell("call_shell_2", "exe_alpha", "echo", "hello"),
                    TextReply("It is gone."),
                )
        assert "[exit_code=0]" in output_of(model, "call_shell_1")
        gone = output_of(model, "call_shell_2")
        assert "exe_alpha" in gone
        assert "not connected" in gone
        assert "hello" not in gone
    finally:
        await gateway.shutdown()


async def test_a_session_outliving_the_token_ttl_keeps_its_executor(
    nursery: trio.Nursery,
    tmp_path: Path,
    real_codex_bin: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    gateway = await _gateway(
        nursery, tmp_path, real_codex_bin, model, exec_gateway, CXG_CAPTOKEN_TTL="1s"
    )
    try:
        with trio.fail_after(TURN_TIMEOUT):
            async with connect(gateway, WORKSPACE) as rpc:
                chat = Conversation(rpc, model)
                await chat.turn(
                    "Run echo one.",
                    _shell("call_shell_1", "exe_alpha", "echo", "one"),
                    TextReply("Done."),
                )
                first = exec_gateway.bridge_attempts[0].authorization or ""
                claims = verify_cap_token(first.removeprefix("Bearer "), CAP_SECRET)
                assert claims.exp - claims.iat == 1
                # Wall-clock time is the event here: the token's expiry is an instant, not a
                # state to poll. The verifier refuses once the current second exceeds exp.
                await trio.sleep(max(0.0, claims.exp + 1.05 - time.time()))
                # The exec gateway refuses that token now: without a fresh one, the next
                # call would fail.
                assert exec_gateway._authorise("exe_alpha", first) == (
                    401,
                    "capability token expired",
                )
                await chat.turn(
                    "Run echo two.",
                    _shell("call_shell_2", "exe_alpha", "echo", "two"),
                    TextReply("Done again."),
                )
        assert "two" in output_of(model, "call_shell_2")
        assert "[exit_code=0]" in output_of(model, "call_shell_2")
        attempts = exec_gateway.bridge_attempts
        assert [a.status for a in attempts] == [101, 101]
        assert attempts[1].authorization != first
    finally:
        await gateway.shutdown()


async def test_the_channel_refuses_foreign_processes_and_foreign_executors(
    nursery: trio.Nursery,
    tmp_path: Path,
    real_codex_bin: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    backend = exec_gateway.executors["exe_alpha"].backend_url
    exec_gateway.add_executor("exe_other", workspace_id="ws_other", backend_url=backend)
    socket_path = tmp_path / "sessions" / WORKSPACE / "run" / SOCKET_NAME
    gateway = await _gateway(nursery, tmp_path, real_codex_bin, model, exec_gateway)
    try:
        with trio.fail_after(TURN_TIMEOUT):
            async with connect(gateway, WORKSPACE) as rpc:
                chat = Conversation(rpc, model)
                # Through the real env-mcp: another workspace's executor is not granted.
                await chat.turn(
                    "Run id on exe_other.",
                    _shell("call_shell_1", "exe_other", "id"),
                    TextReply("Refused."),
                )
                child_pid = await _child_pid(gateway)
                # A process outside the session (this test, the gateway's uid) asks directly.
                with pytest.raises(ChannelError, match="refused: the peer"):
                    parse_grant(await ask(str(socket_path), GrantRequest("exe_alpha")))
                uid = _uid_of(child_pid)
                outsider = stranger = None
                if uid != os.geteuid():
                    # The session's own uid, but not a process of the session.
                    outsider = await _ask_as(uid, socket_path)
                    # Another uid (another session's, say): the kernel refuses the connect.
                    stranger = await _ask_as(uid + 1, socket_path)
        foreign = output_of(model, "call_shell_1")
        assert "exe_other" in foreign
        assert "is not connected to this workspace" in foreign
        if outsider is not None and stranger is not None:
            assert '"ok":false' in outsider
            assert "refused: the peer is not a process of this session" in outsider
            assert TOKEN_PREFIX.decode() not in outsider
            assert "cannot reach the session's executor channel: Permission denied" in stranger
        # Nothing reached a bridge: no token was minted for any of these.
        assert exec_gateway.bridge_attempts == []
    finally:
        await gateway.shutdown()


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


async def _ask_as(uid: int, socket_path: Path) -> str:
    """Ask the channel for a grant from a process running as ``uid`` (not in the session).

    Returns the answer line, or the channel error the asking process met.
    """
    script = (
        "import sys, trio\n"
        "from gateway.envmcp.channel import ChannelError, GrantRequest, ask\n"
        "try:\n"
        "    print(trio.run(ask, sys.argv[1], GrantRequest('exe_alpha')).decode())\n"
        "except ChannelError as exc:\n"
        "    print(exc)\n"
    )
    done = await trio.run_process(
        [str(fake_codex_python()), "-c", script, str(socket_path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


async def test_envmcp_never_holds_the_secret_or_a_token_in_argv_or_environment(
    nursery: trio.Nursery,
    tmp_path: Path,
    real_codex_bin: Path,
    model: FakeModelServer,
    exec_gateway: FakeExecGateway,
) -> None:
    gateway = await _gateway(nursery, tmp_path, real_codex_bin, model, exec_gateway)
    config_path = tmp_path / "sessions" / WORKSPACE / "codex-home" / "config.toml"
    try:
        with trio.fail_after(TURN_TIMEOUT):
            async with connect(gateway, WORKSPACE) as rpc:
                chat = Conversation(rpc, model)
                await chat.turn(
                    "Run echo hi.",
                    _shell("call_shell_1", "exe_alpha", "echo", "hi"),
                    TextReply("."),
                )
                child_pid = await _child_pid(gateway)
                pids = _envmcp_pids(child_pid)
                seen = [
                    (
                        Path(f"/proc/{pid}/environ").read_bytes(),
                        Path(f"/proc/{pid}/cmdline").read_bytes(),
                    )
                    for pid in pids
                ]
                config = config_path.read_bytes()
        assert "[exit_code=0]" in output_of(model, "call_shell_1")
        assert len(seen) == 1, f"expected one env-mcp under the child, found {pids}"
        [(environ, cmdline)] = seen
        # The right process: the channel's variable is there (and only its path).
        assert b"CXG_ENVMCP_CHANNEL=" in environ
        for blob in (environ, cmdline, config):
            assert CAP_SECRET not in blob
            assert exec_gateway.internal_secret.encode() not in blob
            assert TOKEN_PREFIX not in blob
            assert b"CXG_BRIDGE_TOKEN" not in blob
        # A token was minted all the same: for the one bridge connection, by the session.
        assert [a.status for a in exec_gateway.bridge_attempts] == [101]
    finally:
        await gateway.shutdown()


def test_tokens_look_like_the_prefix_the_checks_search_for() -> None:
    # The searches above would pass vacuously if minted tokens began differently.
    from gateway.captoken import mint_cap_token

    token = mint_cap_token(CAP_SECRET, "trn_1", WORKSPACE, "exe_alpha", 60)
    assert token.encode().startswith(TOKEN_PREFIX)
