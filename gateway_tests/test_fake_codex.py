"""Contract tests of the fake codex: real processes, real sockets, no sleeps to wait for state."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    open_websocket_url,
)

from gateway_tests.app_server_process import (
    UPGRADE_HEADERS,
    Client,
    FakeProcess,
    child_env,
    http_get,
    running_fake,
)
from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import rejected_connect

MAX_MESSAGE = 128 * 1024 * 1024


@asynccontextmanager
async def connect(fake: FakeProcess, token: str | None = None) -> AsyncIterator[Client]:
    """An initialized client connection to the fake."""
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else None
    async with open_websocket_url(
        fake.url, max_message_size=MAX_MESSAGE, extra_headers=headers
    ) as ws:
        client = Client(ws)
        await client.initialize()
        yield client


async def start_turn(client: Client, thread_id: str, text: str) -> str:
    """Start a turn with one text input; returns the turn id."""
    result = await client.result(
        "turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": text}]}
    )
    assert result["turn"]["status"] == "inProgress"
    return str(result["turn"]["id"])


# ------------------------------------------------------------------------------------------
# command line


async def test_version_from_any_cwd(fake_codex_bin: Path) -> None:
    done = await trio.run_process([str(fake_codex_bin), "--version"], capture_stdout=True, cwd="/")
    assert done.stdout == b"codex-cli 0.0.0-fake\n"


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [
        (["app-server", "--listen", "ws://localhost:4500"], 2, "expected `ws://IP:PORT`"),
        (["app-server", "--listen", "off"], 1, "no transport configured"),
        (["app-server", "--bogus"], 2, "Usage: codex app-server"),
        (["exec", "hello"], 2, "Usage: codex"),
        (["app-server", "--listen", "ws://127.0.0.1:0", "--ws-token-sha256", "ab"], 2, "--ws-auth"),
        (
            ["app-server", "--listen", "ws://127.0.0.1:0", "--ws-auth", "capability-token"],
            2,
            "exactly one of",
        ),
    ],
)
async def test_command_line_errors(
    fake_codex_bin: Path, tmp_path: Path, args: list[str], status: int, text: str
) -> None:
    done = await trio.run_process(
        [str(fake_codex_bin), *args],
        env=child_env(tmp_path),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == status
    assert text in done.stderr.decode()
    assert done.stdout == b""


async def test_startup_failures(fake_codex_bin: Path, tmp_path: Path) -> None:
    argv = [str(fake_codex_bin), "app-server", "--listen", "ws://127.0.0.1:0"]
    missing = await trio.run_process(
        argv, env=child_env(tmp_path / "missing"), capture_stderr=True, check=False
    )
    assert missing.returncode == 1
    assert b"does not exist" in missing.stderr

    (tmp_path / "config.toml").write_text(
        'model_provider = "gw"\n[model_providers.gw]\nname = "gw"\nwire_api = "chat"\n'
    )
    chat = await trio.run_process(argv, env=child_env(tmp_path), capture_stderr=True, check=False)
    assert chat.returncode == 1
    assert b"no longer supported" in chat.stderr

    failing = make_fake_codex_launcher(tmp_path / "bin", EXIT_AT_START="7")
    knob = await trio.run_process(
        [str(failing), *argv[1:]], env=child_env(tmp_path), capture_stderr=True, check=False
    )
    assert knob.returncode == 7
    assert knob.stderr.strip()


def test_launcher_exports_knobs(tmp_path: Path) -> None:
    first = make_fake_codex_launcher(tmp_path, DELTA_MS="1", outbound_cap="16")
    second = make_fake_codex_launcher(tmp_path, ECHO_BINARY="1")
    assert first.name == "codex"
    assert second.name == "codex-2"
    assert os.access(first, os.X_OK)
    script = first.read_text()
    assert "export FAKE_CODEX_DELTA_MS=1" in script
    assert "export FAKE_CODEX_OUTBOUND_CAP=16" in script
    assert "FAKE_CODEX_ECHO_BINARY" not in script
    with pytest.raises(ValueError):
        make_fake_codex_launcher(tmp_path, **{"BAD-NAME": "1"})


# ------------------------------------------------------------------------------------------
# HTTP surface


async def test_banner_health_origin_and_start_file(fake_codex_bin: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = child_env(home, OPENAI_API_KEY="sk-secret-value", GW_KEY="another-secret")
    home.mkdir()
    (home / "config.toml").write_text(
        'model_provider = "gw"\n[model_providers.gw]\nname = "gw"\n'
        'base_url = "http://127.0.0.1:9/v1"\nenv_key = "GW_KEY"\nwire_api = "responses"\n'
    )
    async with running_fake(fake_codex_bin, home, env=env) as fake:
        banner = [line for line in fake.lines if not line.startswith("fake-codex:")]
        assert banner[0] == "codex app-server (WebSockets)"
        assert banner[1] == f"  listening on: ws://127.0.0.1:{fake.port}"
        assert banner[2] == f"  readyz: http://127.0.0.1:{fake.port}/readyz"
        assert banner[3] == f"  healthz: http://127.0.0.1:{fake.port}/healthz"
        assert banner[4].startswith("  note: binds localhost only")

        with trio.fail_after(10):
            assert (await http_get(fake.port, "/readyz"))[0] == 200
            assert (await http_get(fake.port, "/healthz"))[0] == 200
            assert (await http_get(fake.port, "/readyz", ("Origin", "http://x")))[0] == 403
            status, _ = await http_get(
                fake.port, "/", ("Origin", "https://evil.example"), *UPGRADE_HEADERS
            )
            assert status == 403

        start = json.loads((home / "fake-codex-start.json").read_text())
        assert start["pid"] == fake.proc.pid
        assert start["listen"] == f"ws://127.0.0.1:{fake.port}"
        assert start["OPENAI_API_KEY"] is True
        assert start["CODEX_API_KEY"] is False
        assert start["providerEnvKey"] == "GW_KEY"
        assert start["providerEnvKeySet"] is True
        assert set(start["env_names"]) == set(env)
        raw = (home / "fake-codex-start.json").read_text()
        assert "sk-secret-value" not in raw
        assert "another-secret" not in raw


# ------------------------------------------------------------------------------------------
# auth


async def test_capability_token(fake_codex_bin: Path, tmp_path: Path) -> None:
    token = "per-session-token"
    digest = hashlib.sha256(token.encode()).hexdigest()
    args = ("--ws-auth", "capability-token", "--ws-token-sha256", digest)
    async with running_fake(fake_codex_bin, tmp_path / "home", *args) as fake:
        with trio.fail_after(10):
            status, body = await http_get(fake.port, "/", *UPGRADE_HEADERS)
            assert (status, body) == (401, b"missing websocket bearer token")
            status, body = await http_get(
                fake.port, "/", ("Authorization", "Bearer wrong"), *UPGRADE_HEADERS
            )
            assert (status, body) == (401, b"invalid websocket bearer token")
            assert (await rejected_connect(fake.url)).status_code == 401

            async with connect(fake, token) as client:
                assert (await client.result("fake/pid"))["pid"] == fake.proc.pid


async def test_token_file(fake_codex_bin: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    args = ("--ws-auth", "capability-token", "--ws-token-file", str(token_file))
    async with running_fake(fake_codex_bin, tmp_path / "home", *args) as fake:
        with trio.fail_after(10):
            async with connect(fake, "file-token") as client:
                assert (await client.result("fake/pid"))["pid"] == fake.proc.pid


# ------------------------------------------------------------------------------------------
# protocol


async def test_handshake_thread_turn_and_rollout(fake_codex_bin: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    launcher = make_fake_codex_launcher(tmp_path / "bin", DELTA_MS="1")
    async with running_fake(launcher, home) as fake:
        with trio.fail_after(20):
            async with open_websocket_url(fake.url, max_message_size=MAX_MESSAGE) as ws:
                client = Client(ws)
                early = await client.call("thread/start", {})
                assert early["error"] == {"code": -32600, "message": "Not initialized"}
                # A "jsonrpc" member is tolerated.
                await client.send(
                    {"jsonrpc": "2.0", "id": "initialize", "method": "initialize", "params": {}}
                )
                init = await client.receive()
                assert init["id"] == "initialize"
                assert init["result"] == {
                    "userAgent": "codex_cli_rs/0.0.0-fake (fake)",
                    "codexHome": str(home),
                    "platformFamily": "unix",
                    "platformOs": "linux",
                }
                await client.send({"method": "initialized"})
                again = await client.call("initialize", {})
                assert again["error"]["message"] == "Already initialized"
                assert (await client.call("no/such/method"))["error"]["code"] == -32601

                started = await client.result("thread/start", {"cwd": str(tmp_path)})
                thread = started["thread"]
                assert started["cwd"] == str(tmp_path)
                note = await client.until("thread/started")
                assert note["params"]["thread"]["id"] == thread["id"]

                rollout = Path(thread["path"])
                assert rollout.parent.parent.parent.parent == home / "sessions"
                assert rollout.name.startswith("rollout-")
                assert rollout.name.endswith(f"-{thread['id']}.jsonl")
                meta = json.loads((await trio.Path(rollout).read_text()).splitlines()[0])
                assert meta["type"] == "session_meta"
                assert meta["payload"]["id"] == thread["id"]

                turn_id = await start_turn(client, thread["id"], "hello there")
                await client.until("turn/started")
                user = await client.until("item/completed", turnId=turn_id)
                assert user["params"]["item"]["type"] == "userMessage"
                completed = await client.until("turn/completed")
                assert completed["params"]["turn"]["status"] == "completed"
                deltas = [
                    m["params"]["delta"]
                    for m in client.notifications
                    if m.get("method") == "item/agentMessage/delta"
                ]
                assert len(deltas) > 1
                agent = [
                    m["params"]["item"]
                    for m in client.notifications
                    if m.get("method") == "item/completed"
                    and m["params"]["item"]["type"] == "agentMessage"
                ]
                assert agent[0]["text"] == "".join(deltas)
                assert any(
                    m.get("method") == "thread/tokenUsage/updated" for m in client.notifications
                )

                records = [
                    json.loads(line) for line in (await trio.Path(rollout).read_text()).splitlines()
                ]
                messages = [
                    (r["payload"]["type"], r["payload"].get("message"))
                    for r in records
                    if r["type"] == "event_msg"
                ]
                assert messages == [
                    ("user_message", "hello there"),
                    ("agent_message", "".join(deltas)),
                ]

                listed = await client.result("thread/list", {})
                assert [t["id"] for t in listed["data"]] == [thread["id"]]
                assert listed["data"][0]["preview"] == "hello there"
                assert listed["nextCursor"] is None
                read = await client.result(
                    "thread/read", {"threadId": thread["id"], "includeTurns": True}
                )
                assert len(read["thread"]["turns"]) == 1
                loaded = await client.result("thread/loaded/list")
                assert loaded["data"] == [thread["id"]]
                assert (await client.result("model/list"))["data"]
                assert "config" in await client.result("config/read")
                assert (await client.result("account/read"))["requiresOpenaiAuth"] is True

            # A fresh connection can resume the thread from its rollout.
            async with connect(fake) as other:
                resumed = await other.result("thread/resume", {"threadId": thread["id"]})
                assert resumed["thread"]["id"] == thread["id"]
                missing = await other.call(
                    "thread/resume", {"threadId": "01a20aee-0000-7000-8000-000000000000"}
                )
                assert missing["error"]["code"] == -32600


async def test_notifications_only_to_subscribers(fake_codex_bin: Path, tmp_path: Path) -> None:
    async with running_fake(fake_codex_bin, tmp_path / "home") as fake:
        with trio.fail_after(20):
            async with connect(fake) as owner, connect(fake) as bystander:
                thread = (await owner.result("thread/start", {}))["thread"]
                await start_turn(owner, thread["id"], "hi")
                await owner.until("turn/completed")
                # Anything meant for the bystander would have been queued before this reply.
                await bystander.send({"id": 99, "method": "fake/pid", "params": {}})
                first = await bystander.receive()
                assert first == {"id": 99, "result": {"pid": fake.proc.pid}}


async def test_scripted_fail_and_env(fake_codex_bin: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = child_env(home, OPENAI_API_KEY="sk-do-not-print")
    async with running_fake(fake_codex_bin, home, env=env) as fake:
        with trio.fail_after(20):
            async with connect(fake) as client:
                thread_id = (await client.result("thread/start", {}))["thread"]["id"]
                await start_turn(client, thread_id, "__fail__")
                error = await client.until("error")
                assert error["params"]["error"]["message"]
                failed = await client.until("turn/completed")
                assert failed["params"]["turn"]["status"] == "failed"

                await start_turn(client, thread_id, "__env__")
                await client.until("turn/completed")
                text = [
                    m["params"]["item"]["text"]
                    for m in client.notifications
                    if m.get("method") == "item/completed"
                    and m["params"]["item"]["type"] == "agentMessage"
                ][-1]
                assert "OPENAI_API_KEY=set" in text
                assert "CODEX_API_KEY=unset" in text
                assert "sk-do-not-print" not in text


async def test_interrupt_slow_turn(fake_codex_bin: Path, tmp_path: Path) -> None:
    async with running_fake(fake_codex_bin, tmp_path / "home") as fake:
        with trio.fail_after(20):
            async with connect(fake) as client:
                thread_id = (await client.result("thread/start", {}))["thread"]["id"]
                turn_id = await start_turn(client, thread_id, "__slow__")
                await client.until("item/agentMessage/delta")
                assert (
                    await client.result(
                        "turn/interrupt", {"threadId": thread_id, "turnId": turn_id}
                    )
                    == {}
                )
                done = await client.until("turn/completed")
                assert done["params"]["turn"]["status"] == "interrupted"


async def test_crash_exits_3(fake_codex_bin: Path, tmp_path: Path) -> None:
    async with running_fake(fake_codex_bin, tmp_path / "home") as fake:
        with trio.fail_after(20):
            async with connect(fake) as client:
                thread_id = (await client.result("thread/start", {}))["thread"]["id"]
                await start_turn(client, thread_id, "__crash__")
                assert await fake.proc.wait() == 3


# ------------------------------------------------------------------------------------------
# test-only extras


async def test_large_text_echo(fake_codex_bin: Path, tmp_path: Path) -> None:
    payload = "x" * (60 * 1024 * 1024)
    async with running_fake(fake_codex_bin, tmp_path / "home") as fake:
        with trio.fail_after(60):
            async with connect(fake) as client:
                await client.send({"id": 1, "method": "fake/echo", "params": {"payload": payload}})
                raw = await client.ws.get_message()
                assert len(raw) == len(payload) + len('{"id":1,"result":{"payload":""}}')
                assert json.loads(raw)["result"]["payload"] == payload


async def test_binary_frames(fake_codex_bin: Path, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 1000
    echoing = make_fake_codex_launcher(tmp_path / "bin", ECHO_BINARY="1")
    async with running_fake(echoing, tmp_path / "home") as fake:
        with trio.fail_after(10):
            async with connect(fake) as client:
                await client.ws.send_message(blob)
                assert await client.ws.get_message() == blob

    # Without the knob binary frames are dropped, like the real server does.
    async with running_fake(fake_codex_bin, tmp_path / "home2") as fake:
        with trio.fail_after(10):
            async with connect(fake) as client:
                await client.ws.send_message(blob)
                await client.send({"id": 5, "method": "fake/pid", "params": {}})
                assert await client.receive() == {"id": 5, "result": {"pid": fake.proc.pid}}


async def test_close_codes_both_ways(fake_codex_bin: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with running_fake(fake_codex_bin, home) as fake:
        with trio.fail_after(10):
            async with connect(fake) as client:
                reply = await client.call("fake/close", {"code": 4321, "reason": "as asked"})
                assert reply["result"] == {}
                with pytest.raises(ConnectionClosed) as closed:
                    await client.ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 4321
                assert closed.value.reason.reason == "as asked"

            async with connect(fake) as client:
                await client.ws.aclose(4005, "client leaving")
            await fake.wait_for_line(r"peer closed connection \d+ code=4005")
            records = [
                json.loads(line)
                for line in (home / "fake-codex-closes.jsonl").read_text().splitlines()
            ]
            assert {"code": 4005, "reason": "client leaving"} in records


async def test_slow_consumer_is_disconnected(fake_codex_bin: Path, tmp_path: Path) -> None:
    launcher = make_fake_codex_launcher(tmp_path / "bin", OUTBOUND_CAP="32", FLOOD_DELTAS="200000")
    async with running_fake(launcher, tmp_path / "home") as fake:
        with trio.fail_after(60):
            async with connect(fake) as client:
                thread_id = (await client.result("thread/start", {}))["thread"]["id"]
                await start_turn(client, thread_id, "__flood__")
                # Stop reading: socket buffers fill, then the fake's queue, then it hangs up.
                await fake.wait_for_line(r"disconnecting slow connection")


# ------------------------------------------------------------------------------------------
# signals


async def test_sigterm_drains_running_turn(fake_codex_bin: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    launcher = make_fake_codex_launcher(tmp_path / "bin", SLOW_DELTAS="30", SLOW_DELTA_MS="20")
    async with running_fake(launcher, home) as fake:
        with trio.fail_after(20):
            async with connect(fake) as client:
                thread_id = (await client.result("thread/start", {}))["thread"]["id"]
                await start_turn(client, thread_id, "__slow__")
                await client.until("item/agentMessage/delta")
                fake.proc.send_signal(signal.SIGTERM)
                await fake.wait_for_line(r"draining")

                refused = await client.call(
                    "turn/start",
                    {"threadId": thread_id, "input": [{"type": "text", "text": "more"}]},
                )
                assert refused["error"] == {
                    "code": -32600,
                    "message": "Server is draining; retry after reconnecting",
                    "data": {"reason": "serverShuttingDown"},
                }
                done = await client.until("turn/completed")
                assert done["params"]["turn"]["status"] == "completed"
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await client.ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1001
            assert await fake.proc.wait() == 0
        exit_info = json.loads((home / "fake-codex-exit.json").read_text())
        assert exit_info["reason"] == "drained"
        assert exit_info["signals"] == 1
        assert exit_info["openTurns"] == []


async def test_second_sigterm_exits_at_once(fake_codex_bin: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with running_fake(fake_codex_bin, home) as fake:
        with trio.fail_after(20):
            async with connect(fake) as client:
                thread_id = (await client.result("thread/start", {}))["thread"]["id"]
                await start_turn(client, thread_id, "__slow__")
                await client.until("item/agentMessage/delta")
                fake.proc.send_signal(signal.SIGTERM)
                await fake.wait_for_line(r"draining")
                fake.proc.send_signal(signal.SIGTERM)
                assert await fake.proc.wait() == 0
        exit_info = json.loads((home / "fake-codex-exit.json").read_text())
        assert exit_info["reason"] == "forced"
        assert exit_info["signals"] == 2
        assert len(exit_info["openTurns"]) == 1


async def test_ignore_sigterm_knob(tmp_path: Path) -> None:
    launcher = make_fake_codex_launcher(tmp_path / "bin", IGNORE_SIGTERM="1")
    async with running_fake(launcher, tmp_path / "home") as fake:
        with trio.fail_after(10):
            fake.proc.send_signal(signal.SIGTERM)
            # An ignored signal is discarded when sent, so the fake must still be serving.
            async with connect(fake) as client:
                assert (await client.result("fake/pid"))["pid"] == fake.proc.pid
            fake.proc.kill()
            assert await fake.proc.wait() == -signal.SIGKILL


# ------------------------------------------------------------------------------------------
# stdio


async def test_stdio_transport(fake_codex_bin: Path, tmp_path: Path) -> None:
    lines = [
        {"id": "initialize", "method": "initialize", "params": {}},
        {"method": "initialized"},
        {"id": 1, "method": "fake/echo", "params": {"payload": [1, "two"]}},
    ]
    stdin = "".join(json.dumps(line) + "\n" for line in lines).encode()
    with trio.fail_after(10):
        done = await trio.run_process(
            [str(fake_codex_bin), "app-server", "--listen", "stdio://"],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            env=child_env(tmp_path),
        )
    answers = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert answers[0]["id"] == "initialize"
    assert answers[1] == {"id": 1, "result": {"payload": [1, "two"]}}
